from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import BooleanField, EmailField, PasswordField, StringField
from wtforms.validators import DataRequired, Email, Length, Optional

from app.auth.forms import _one_line_of_text, _strip


class TwoFactorCodeForm(FlaskForm):
    """A code from the authenticator app (six digits) or a recovery code."""

    code = StringField("Code", filters=[_strip], validators=[DataRequired(message="Type the code."), Length(max=64)])


class ConfirmAccessForm(FlaskForm):
    """Confirm it's you: the password, or a two-factor code."""

    password = PasswordField("Your password", validators=[Optional(), Length(max=128)])
    code = StringField(
        "Or a code from your authenticator app", filters=[_strip], validators=[Optional(), Length(max=64)]
    )


class RequireTwoFactorForm(FlaskForm):
    required = BooleanField("Require two-factor sign-in of every member")


class ActionForm(FlaskForm):
    """A button that changes something: the CSRF token is all it carries."""


class ChangeEmailForm(FlaskForm):
    """The address to move the account to; the link that confirms it goes there."""

    new_email = EmailField(
        "New email address",
        filters=[_strip],
        validators=[DataRequired(), Length(max=254), _one_line_of_text, Email(check_deliverability=False)],
    )
