# The two commands of the README's quick start, and the benchmarks.
.PHONY: run test bench property-test chaos

run:  ## set up and run the app (with the offline Stripe sandbox unless STRIPE_SECRET_KEY is set)
	scripts/dev

test:  ## set up and run lint, types and every test, then the live-mode signup against the sandbox
	scripts/test

bench:  ## run the benchmarks and write docs/PERFORMANCE.md
	scripts/bench

property-test:  ## the owner-action state machine, longer than CI runs it (OWNER_ACTION_EXAMPLES, OWNER_ACTION_STEPS)
	OWNER_ACTION_EXAMPLES=$${OWNER_ACTION_EXAMPLES:-50} OWNER_ACTION_STEPS=$${OWNER_ACTION_STEPS:-30} \
		.venv/bin/python -m pytest -q tests/test_owner_actions_property.py

chaos:  ## the long fault-injection run (CHAOS_SEED, CHAOS_ORGS, CHAOS_ROUNDS; the seed is printed)
	scripts/chaos
