from __future__ import annotations

from typing import Any

from flask_wtf import FlaskForm
from wtforms import HiddenField, IntegerField, RadioField, SelectChoice, StringField
from wtforms.validators import DataRequired, InputRequired, Length, NumberRange, Optional, Regexp

from app.services.billing_service import REQUEST_TOKEN, new_request_token
from app.services.plans import PlanCatalogue
from app.services.tax import TAX_ID_TYPES


class OwnerActionForm(FlaskForm):
    """Every owner action carries a one-time token: a double-submitted form makes one Stripe call."""

    request_token = HiddenField(validators=[DataRequired(), Regexp(REQUEST_TOKEN)], default=new_request_token)


class PortalForm(FlaskForm):
    pass


class CancelForm(OwnerActionForm):
    when = RadioField(
        "When should the plan end?",
        choices=[
            SelectChoice("period_end", "At the end of the billing period"),
            SelectChoice("now", "Right now, without a refund"),
        ],
        default="period_end",
        validators=[DataRequired()],
    )
    # Ending the plan now is irreversible: the first post shows what is lost and asks again; only a
    # post carrying confirmed=yes (the confirmation page's button) ends it.
    confirmed = HiddenField()

    def ends_now(self) -> bool:
        return bool(self.when.data == "now")

    def needs_confirmation(self) -> bool:
        return self.ends_now() and self.confirmed.data != "yes"


class ResumeForm(OwnerActionForm):
    pass


class DowngradeToFreeForm(OwnerActionForm):
    pass


class BillingEmailForm(FlaskForm):
    billing_email = StringField("Send receipts to", validators=[Optional(), Length(max=254)])


class OrganizationNameForm(FlaskForm):
    """The organization's name (organization_profile.clean_name checks it and says why not)."""

    name = StringField("Organization name", validators=[Length(max=1000)])


class BillingAddressForm(OwnerActionForm):
    """The billing address Stripe Tax reads (kept on Stripe's customer, app/services/tax.py)."""

    line1 = StringField("Address", validators=[Optional(), Length(max=200)])
    line2 = StringField("Address line 2", validators=[Optional(), Length(max=200)])
    postal_code = StringField("Postal code", validators=[Optional(), Length(max=20)])
    city = StringField("City", validators=[Optional(), Length(max=100)])
    state = StringField("State or region", validators=[Optional(), Length(max=100)])
    country = StringField("Country (two letters)", validators=[DataRequired(), Length(min=2, max=2)])


class TaxIdForm(OwnerActionForm):
    type = RadioField(
        "Kind",
        choices=[SelectChoice(k, words) for k, (words, _) in TAX_ID_TYPES.items()],
        default="eu_vat",
        validators=[DataRequired()],
    )
    value = StringField("Tax ID", validators=[DataRequired(), Length(max=40)])


class RemoveTaxIdForm(OwnerActionForm):
    tax_id = HiddenField(validators=[DataRequired(), Regexp(r"^txi_\w+$")])


class ResubscribeForm(OwnerActionForm):
    tier = RadioField("Plan", validators=[DataRequired(message="Choose a plan.")])


def resubscribe_form(catalogue: PlanCatalogue) -> ResubscribeForm:
    form = ResubscribeForm()
    form.tier.choices = [SelectChoice(tier.key, tier.name) for tier in catalogue.paid_tiers()]
    return form


class ChangePlanForm(FlaskForm):
    tier = RadioField("Plan", validators=[DataRequired(message="Choose a plan.")])
    interval = RadioField(
        "Billed",
        choices=[SelectChoice("month", "Monthly"), SelectChoice("year", "Yearly")],
        default="month",
        validators=[DataRequired()],
    )
    # A promotion code for the change (optional): it replaces the subscription's discount; left empty,
    # the discount the subscription has carries on.
    promotion_code = StringField("Promotion code", validators=[Optional(), Length(max=100)])


def change_plan_form(catalogue: PlanCatalogue, **kwargs: Any) -> ChangePlanForm:
    form = ChangePlanForm(**kwargs)
    form.tier.choices = [SelectChoice(tier.key, tier.name) for tier in catalogue.tiers.values()]
    return form


class ChangeSeatsForm(FlaskForm):
    extra_seats = IntegerField(
        "Extra seats", validators=[InputRequired(message="Say how many extra seats."), NumberRange(min=0, max=10_000)]
    )


class ConfirmChangeForm(FlaskForm):
    ticket = HiddenField(validators=[DataRequired(), Length(max=4000)])


class KeepPlanForm(FlaskForm):
    pass
