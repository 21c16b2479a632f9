from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import EmailField, PasswordField, StringField
from wtforms.validators import DataRequired, Email, Length

from app.auth.forms import _one_line_of_text, _strip


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
    password = PasswordField(
        "Password", validators=[DataRequired(), Length(min=12, max=128, message="Use 12 to 128 characters.")]
    )
