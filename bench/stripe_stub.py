"""A Stripe API that answers at once, for timing the signup POST without Stripe's latency:
GET /v1/prices (by lookup key) and POST /v1/checkout/sessions, with Stripe-shaped JSON.
Anything else is a Stripe-shaped 404. Usage: python -m bench.stripe_stub PORT
"""

from __future__ import annotations

import json
import sys
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit


class StripeStub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's requests session expects

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/v1/prices":
            self._answer(404, {"error": {"type": "invalid_request_error", "message": f"No route {url.path}"}})
            return
        lookup_keys = [value for key, value in parse_qsl(url.query) if key.startswith("lookup_keys[")]
        prices = [
            {
                "id": f"price_stub_{key}",
                "object": "price",
                "active": True,
                "currency": "usd",
                "lookup_key": key,
                "recurring": {"interval": "month", "interval_count": 1},
                "type": "recurring",
                "unit_amount": 4900,
            }
            for key in lookup_keys
        ]
        self._answer(200, {"object": "list", "data": prices, "has_more": False, "url": "/v1/prices"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if urlsplit(self.path).path != "/v1/checkout/sessions":
            self._answer(404, {"error": {"type": "invalid_request_error", "message": f"No route {self.path}"}})
            return
        session_id = f"cs_test_stub{uuid.uuid4().hex}"
        self._answer(
            200,
            {
                "id": session_id,
                "object": "checkout.session",
                "livemode": False,
                "mode": "subscription",
                "payment_status": "unpaid",
                "status": "open",
                "url": f"https://checkout.stripe.test/c/pay/{session_id}",
            },
        )

    def _answer(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Request-Id", f"req_stub{uuid.uuid4().hex[:14]}")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        """Quiet: the benchmark does not want a line per request."""


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), StripeStub).serve_forever()
