"""Taxes: the settings (STRIPE_AUTOMATIC_TAX, PRICES_SHOWN_WITH_TAX), the sandbox's Stripe Tax (its rate
table, tax IDs and their verification, reverse charge and exemption), Checkout collecting the billing
address and tax IDs, and the billing page showing and editing them."""

from __future__ import annotations

import pytest

from config import TestConfig


def test_tax_settings_come_from_the_environment_and_default_to_off_and_exclusive() -> None:
    config = TestConfig({"TEST_DATABASE_URL": "postgresql://x/y"})
    assert (config.STRIPE_AUTOMATIC_TAX, config.PRICES_SHOWN_WITH_TAX) == (False, "exclusive")
    config = TestConfig({"STRIPE_AUTOMATIC_TAX": "1", "PRICES_SHOWN_WITH_TAX": "Inclusive"})
    assert (config.STRIPE_AUTOMATIC_TAX, config.PRICES_SHOWN_WITH_TAX) == (True, "inclusive")
    with pytest.raises(ValueError, match="PRICES_SHOWN_WITH_TAX"):
        TestConfig({"PRICES_SHOWN_WITH_TAX": "both"})
