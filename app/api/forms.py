from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import StringField
from wtforms.validators import DataRequired, Length

from app.auth.forms import _one_line_of_text, _strip


class NewKeyForm(FlaskForm):
    name = StringField(
        "Name (the service that will use it)",
        filters=[_strip],
        validators=[DataRequired(), Length(max=100), _one_line_of_text],
    )


class ActionForm(FlaskForm):
    """Revoke a key: the CSRF token is all it carries."""
