"""The benchmarks behind docs/PERFORMANCE.md. `make bench` (scripts/bench) runs `python -m bench`.

- events.py: the webhook payloads (Stripe-shaped), numbered so every delivery is a distinct event.
- webhook.lua: the wrk script; it fills the same payload template and signs each request as Stripe does.
- loads.py: closed-loop runs with wrk, the constant-rate (open-loop) run in Python, signup timing.
- anchor.py: the verify-only and store-only endpoints the app is compared with.
- burst.py: the queue benchmarks: a burst of deliveries applied by the worker against the sandbox.
- services.py: the benchmark database, and the servers (redis-server, gunicorn, the sandbox, a mail sink,
  the worker), started and stopped.
- report.py: the table, and docs/PERFORMANCE.md.
"""
