from __future__ import annotations

from typing import Any

from flask_wtf import FlaskForm
from wtforms import EmailField, PasswordField, StringField
from wtforms.validators import DataRequired, Email, Length

from app.auth.forms import NEW_PASSWORD_LENGTH, _one_line_of_text, _strip, check_new_password


class InviteForm(FlaskForm):
    email = EmailField(
        "Teammate's email",
        filters=[_strip],
        validators=[DataRequired(), Length(max=254), _one_line_of_text, Email(check_deliverability=False)],
    )


class ActionForm(FlaskForm):
    """Revoke an invitation or remove a member: the CSRF token is all it carries."""


class JoinForm(FlaskForm):
    name = StringField("Your name", filters=[_strip], validators=[DataRequired(), Length(max=100), _one_line_of_text])
    password = PasswordField("Password", validators=[DataRequired(), NEW_PASSWORD_LENGTH])

    def __init__(self, *args: Any, email: str = "", **kwargs: Any) -> None:
        """``email``: the invited address, which the password must not contain."""
        super().__init__(*args, **kwargs)
        self.account_email = email

    def validate_password(self, field: PasswordField) -> None:
        check_new_password(field, self.account_email)
