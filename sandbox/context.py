"""The running sandbox's store and settings, for code that runs inside a request."""

from __future__ import annotations

from flask import current_app

from .config import Settings
from .store import Store


def current_store() -> Store:
    store: Store = current_app.config["SANDBOX_STORE"]
    return store


def current_settings() -> Settings:
    settings: Settings = current_app.config["SANDBOX_SETTINGS"]
    return settings
