.PHONY: run test bootstrap bench bench-rollout bench-chaos clean

run:
	@scripts/run.sh

test:
	@scripts/test.sh $(PYTEST_ARGS)

bootstrap:
	@scripts/bootstrap.sh --test

bench:
	@scripts/bootstrap.sh --test
	@scripts/ensure_services.sh --postgres
	.venv/bin/python benchmarks/run_all.py

bench-rollout:
	@scripts/bootstrap.sh --test
	@scripts/ensure_services.sh --postgres
	.venv/bin/python benchmarks/rollout_fleet.py

bench-chaos:
	@scripts/bootstrap.sh --test
	@scripts/ensure_services.sh --postgres
	.venv/bin/python benchmarks/chaos.py

clean:
	rm -rf var .pytest_cache
