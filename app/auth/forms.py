from __future__ import annotations

import unicodedata
from typing import Any

from flask_wtf import FlaskForm
from wtforms import EmailField, IntegerField, PasswordField, RadioField, SelectChoice, StringField
from wtforms.validators import DataRequired, Email, EqualTo, Length, NumberRange, Optional, ValidationError

from app.services import password_policy
from app.services.plans import PlanCatalogue


def _strip(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def _one_line_of_text(form: Any, field: Any) -> None:
    """Names and emails are a line of text. Control characters (NUL among them, which PostgreSQL cannot
    store) are refused here with a message instead of failing the request later."""
    if any(unicodedata.category(character) == "Cc" for character in field.data or ""):
        raise ValidationError("Remove the control characters (such as tabs or line breaks) from this field.")


def check_new_password(field: Any, email: str | None) -> None:
    """The one password policy (app/services/password_policy.py) for a form's new-password field:
    signup, joining through an invitation, reset and change. Raises ValidationError with its reason."""
    if field.errors:  # already refused (required, or too long for the length check to matter)
        return
    try:
        password_policy.check_new_password(field.data, email=email)
    except password_policy.PasswordRejected as exc:
        raise ValidationError(str(exc)) from None


# Sets the field's length bounds; the policy says what is wrong with a password out of them.
NEW_PASSWORD_LENGTH = Length(max=password_policy.MAX_LENGTH, message=password_policy.LENGTH_MESSAGE)


class SignupForm(FlaskForm):
    email = EmailField(
        "Work email",
        filters=[_strip],
        validators=[DataRequired(), Length(max=254), _one_line_of_text, Email(check_deliverability=False)],
    )
    password = PasswordField("Password", validators=[DataRequired(), NEW_PASSWORD_LENGTH])
    organization_name = StringField(
        "Organization name", filters=[_strip], validators=[DataRequired(), Length(min=2, max=100), _one_line_of_text]
    )
    owner_name = StringField(
        "Your name", filters=[_strip], validators=[DataRequired(), Length(max=100), _one_line_of_text]
    )
    tier = RadioField("Plan", validators=[DataRequired(message="Choose a plan.")], validate_choice=True)
    # Who takes the payment: shown only when Whop is configured; absent means card (Stripe Checkout).
    payment_provider = RadioField(
        "Pay with",
        choices=[SelectChoice("stripe", "Card (Stripe Checkout)"), SelectChoice("whop", "Whop")],
        default="stripe",
        validators=[Optional()],
        validate_choice=False,
    )

    def validate_payment_provider(self, field: RadioField) -> None:
        if field.data not in (None, "", "stripe", "whop"):
            raise ValidationError("Choose card or Whop.")

    def provider(self) -> str:
        return "whop" if self.payment_provider.data == "whop" else "stripe"

    interval = RadioField(
        "Billed",
        choices=[SelectChoice("month", "Monthly"), SelectChoice("year", "Yearly")],
        default="month",
        validators=[Optional()],
        validate_choice=True,
    )

    def validate_password(self, field: PasswordField) -> None:
        check_new_password(field, self.email.data)

    free_tier_key: str | None = None  # the catalogue's free tier: nothing to pay, so nothing to add

    def validate_tier(self, field: RadioField) -> None:
        if field.data and field.data == self.free_tier_key:
            if any(self.addon_quantities().values()):
                raise ValidationError("Add-ons need a paid plan: remove them, or choose a paid plan.")
            if self.provider() == "whop":
                raise ValidationError("The free plan needs no payment: choose card payment, or another plan.")

    def addon_fields(self) -> list[tuple[str, IntegerField]]:
        return [
            (name.removeprefix("addon_"), field) for name, field in self._fields.items() if name.startswith("addon_")
        ]

    def addon_quantities(self) -> dict[str, int]:
        return {key: field.data or 0 for key, field in self.addon_fields()}


def signup_form(catalogue: PlanCatalogue, **kwargs: Any) -> SignupForm:
    """The signup form for this catalogue: one plan choice per tier, one quantity per add-on."""
    fields = {
        f"addon_{addon.key}": IntegerField(
            addon.name,
            default=0,
            validators=[Optional(), NumberRange(min=0, max=addon.max_quantity)],
            description=addon.description,
        )
        for addon in catalogue.addons.values()
    }
    form_class = type("CatalogueSignupForm", (SignupForm,), fields)
    form: SignupForm = form_class(**kwargs)
    form.tier.choices = [SelectChoice(tier.key, tier.name) for tier in catalogue.tiers.values()]
    free = catalogue.free_tier()
    form.free_tier_key = free.key if free else None
    return form


class LoginForm(FlaskForm):
    email = EmailField("Email", filters=[_strip], validators=[DataRequired(), Length(max=254), _one_line_of_text])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=128)])


class ForgotPasswordForm(FlaskForm):
    email = EmailField("Email", filters=[_strip], validators=[DataRequired(), Length(max=254), _one_line_of_text])


class NewPasswordForm(FlaskForm):
    """A new password, typed twice; ``email`` is the account's, which the password must not contain."""

    password = PasswordField("New password", validators=[DataRequired(), NEW_PASSWORD_LENGTH])
    confirm = PasswordField(
        "New password again", validators=[DataRequired(), EqualTo("password", message="The two passwords differ.")]
    )

    def __init__(self, *args: Any, email: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.account_email = email

    def validate_password(self, field: PasswordField) -> None:
        check_new_password(field, self.account_email)


class ChangePasswordForm(NewPasswordForm):
    current_password = PasswordField("Current password", validators=[DataRequired(), Length(max=128)])
