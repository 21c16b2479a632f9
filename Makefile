# The two commands of the README's quick start, and the benchmarks.
.PHONY: run test bench chaos

run:  ## set up and run the app (with the offline Stripe sandbox unless STRIPE_SECRET_KEY is set)
	scripts/dev

test:  ## set up and run lint, types and every test, then the live-mode signup against the sandbox
	scripts/test

bench:  ## run the benchmarks and write docs/PERFORMANCE.md
	scripts/bench

chaos:  ## the long fault-injection run (CHAOS_SEED, CHAOS_ORGS, CHAOS_ROUNDS; the seed is printed)
	scripts/chaos
