"""An offline, Stripe-compatible development server for this product's billing flows.

Run it with ``python -m sandbox``; see sandbox/README.md.
"""
