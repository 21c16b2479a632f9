"""Security headers on every response."""

from flask import Flask, Response, request

from app.machine_routes import MachineRoutes

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "frame-ancestors 'none'; base-uri 'self'; object-src 'none'"
)


def security_headers(production: bool) -> list[tuple[str, str]]:
    """The headers every response carries unless it set its own (pages, and the machine entry's)."""
    headers = [
        ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
        ("X-Frame-Options", "DENY"),
        ("X-Content-Type-Options", "nosniff"),
        # Success URLs carry checkout ids; keep them off other sites' logs.
        ("Referrer-Policy", "same-origin"),
        ("Cross-Origin-Opener-Policy", "same-origin"),
    ]
    if production:
        headers.append(("Strict-Transport-Security", "max-age=31536000; includeSubDomains"))
    return headers


def init_security_headers(app: Flask) -> None:
    defaults = security_headers(app.config["APP_ENV"] == "production")

    @app.after_request
    def add_security_headers(response: Response) -> Response:
        headers = response.headers
        for name, value in defaults:
            headers.setdefault(name, value)
        # Pages carry account and billing data and forms with a session's CSRF token: no browser or proxy
        # keeps them (the back button after sign-out shows nothing). Static files are the exception.
        if request.endpoint != "static":
            headers["Cache-Control"] = "no-store"
        return response

    if isinstance(app, MachineRoutes):  # every response carries them, machine routes' too
        app.machine_after.append(add_security_headers)
