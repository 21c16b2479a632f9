"""Stripe's error format: an HTTP status plus {"error": {type, code, param, message, doc_url}}."""

from __future__ import annotations

from typing import Any


class StripeError(Exception):
    """An API error, rendered exactly as Stripe renders it so the SDK raises the same class."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.type}
        if self.code:
            error["code"] = self.code
            error["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if self.param:
            error["param"] = self.param
        return {"error": error}


def missing(param: str) -> StripeError:
    return StripeError(f"Missing required param: {param}.", code="parameter_missing", param=param)


def unknown(param: str) -> StripeError:
    return StripeError(f"Received unknown parameter: {param}", code="parameter_unknown", param=param)


def exclusive(first: str, second: str, param: str) -> StripeError:
    """Two parameters that cannot be sent together; `param` is the one Stripe names."""
    return StripeError(
        f"You may only specify one of these parameters: {first}, {second}.", code="parameters_exclusive", param=param
    )


def inactive_price(param: str) -> StripeError:
    return StripeError("The price specified is inactive. This field only accepts active prices.", param=param)


def no_such(kind: str, object_id: str, param: str, status: int = 404) -> StripeError:
    """Stripe answers 404 for a missing path object and 400 for a missing referenced one."""
    return StripeError(
        f"No such {kind}: '{object_id}'",
        status=status,
        code="resource_missing",
        param=param,
    )
