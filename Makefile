.PHONY: run test bootstrap bench clean

run:
	@scripts/run.sh

test:
	@scripts/test.sh $(PYTEST_ARGS)

bootstrap:
	@scripts/bootstrap.sh --test

bench:
	@scripts/bootstrap.sh --test
	.venv/bin/python benchmarks/run_all.py

clean:
	rm -rf var .pytest_cache
