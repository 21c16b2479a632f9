"""The one password policy: every new password (signup, joining through an invitation, reset, change)
is checked here, by the forms of each of those pages (app/auth/forms.py, app/team/forms.py).

- 12 to 128 characters (OWASP ASVS 2.1.1/2.1.2); no composition rules (ASVS 2.1.9).
- Not a common password: the 30,000 most common passwords of leaked password dumps, as shipped by the
  zxcvbn package, loaded once per process into a frozenset (``common_passwords()``, warmed by the app
  factory). A password is refused when it is on the list, or is a listed one repeated or padded with
  digits and symbols ("Password2024!", "qwertyqwerty").
- Not guessable by the zxcvbn estimator (score 3 or better out of 4, which means "safely unguessable:
  moderate protection from an offline attack"), with the account's email address as a known word.
- Not containing the account's email address or its local part.
"""

from __future__ import annotations

import re
from functools import cache

from zxcvbn import zxcvbn
from zxcvbn.frequency_lists import FREQUENCY_LISTS

MIN_LENGTH = 12
MAX_LENGTH = 128
MIN_DISTINCT_CHARACTERS = 5
MIN_ZXCVBN_SCORE = 3
# zxcvbn refuses longer input (its matching grows quickly with length); a longer password is judged by
# its first 72 characters, which is enough to tell a strong one.
ZXCVBN_MAX_LENGTH = 72

LENGTH_MESSAGE = f"Use {MIN_LENGTH} to {MAX_LENGTH} characters."
COMMON_MESSAGE = "That password is on lists of common passwords that attackers try first. Choose another."
GUESSABLE_MESSAGE = "That password is too easy to guess."
EMAIL_MESSAGE = "Your password must not contain your email address."

_PADDING = re.compile(r"^[\W\d_]+|[\W\d_]+$")


class PasswordRejected(ValueError):
    """The message is meant for the person choosing the password."""


@cache
def common_passwords() -> frozenset[str]:
    """The common-password list, lower-cased. Read once per process (about 30,000 entries, ~2 MB)."""
    return frozenset(word.lower() for word in FREQUENCY_LISTS["passwords"])


def _repeated_unit(text: str) -> str:
    """ "abcabcabc" -> "abc"; text that is no repetition comes back as it is."""
    for size in range(1, len(text) // 2 + 1):
        if len(text) % size == 0 and text[:size] * (len(text) // size) == text:
            return text[:size]
    return text


def is_common(password: str) -> bool:
    lowered = password.lower()
    core = _PADDING.sub("", lowered)
    candidates = {lowered, core, _repeated_unit(lowered), _repeated_unit(core), lowered.replace(" ", "")}
    listed = common_passwords()
    return any(candidate in listed for candidate in candidates if candidate)


def check_new_password(password: str | None, *, email: str | None = None) -> None:
    """Raise PasswordRejected, with the reason, unless ``password`` may be the new password of the
    account at ``email``."""
    password = password or ""
    if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        raise PasswordRejected(LENGTH_MESSAGE)
    lowered = password.lower()
    email = (email or "").strip().lower()
    local_part = email.split("@")[0]
    if email and (email in lowered or (len(local_part) >= 4 and local_part in lowered)):
        raise PasswordRejected(EMAIL_MESSAGE)
    if is_common(password):
        raise PasswordRejected(COMMON_MESSAGE)
    if len(set(lowered)) < MIN_DISTINCT_CHARACTERS:
        raise PasswordRejected(GUESSABLE_MESSAGE)
    known_words = [word for word in (email, local_part, "ledgerline") if word]
    if zxcvbn(password[:ZXCVBN_MAX_LENGTH], user_inputs=known_words)["score"] < MIN_ZXCVBN_SCORE:
        raise PasswordRejected(GUESSABLE_MESSAGE)
