from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import HiddenField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, Optional, Regexp

from app.services.billing_service import REQUEST_TOKEN, new_request_token


class StaffActionForm(FlaskForm):
    """A console action's confirmation: the reason (kept in the staff audit log), a one-time token (a
    double submit is one action) and, for actions that move money, a two-factor code."""

    request_token = HiddenField(validators=[DataRequired(), Regexp(REQUEST_TOKEN)], default=new_request_token)
    target = HiddenField()
    reason = TextAreaField(
        "Reason (kept in the staff audit log)",
        validators=[DataRequired(message="Type the reason for this action."), Length(max=2000)],
    )
    amount = StringField(
        "Amount to refund (leave empty for the whole payment)",
        validators=[Optional(), Regexp(r"^\d+(\.\d{1,2})?$", message="An amount such as 12.50.")],
    )
    days = StringField(
        "Extend the trial by (days, 1 to 90)",
        validators=[Optional(), Regexp(r"^\d{1,3}$", message="A number of days such as 7.")],
    )
    coupon = StringField(
        "Coupon id (as the Stripe Dashboard shows it)",
        validators=[Optional(), Regexp(r"^[A-Za-z0-9_-]{1,200}$", message="A coupon id such as SPRING20.")],
    )
    code = StringField("Two-factor code (from your authenticator app)", validators=[Optional(), Length(max=20)])


class SearchForm(FlaskForm):
    class Meta:
        csrf = False  # a GET search changes nothing

    q = StringField("Search", validators=[Optional(), Length(max=255)])


class ViewAsForm(FlaskForm):
    reason = TextAreaField(
        "Reason (kept in the staff audit log)",
        validators=[DataRequired(message="Type the reason for viewing as the owner."), Length(max=2000)],
    )
