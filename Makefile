# engineforge — `make run` and `make test` create the environment when it is missing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= all
# profiles/default (content checksums, keep-going, mlflow=1) is picked up by snakemake itself,
# so `make run` and a plain `snakemake` behave the same.

.PHONY: run test test-fast cluster-test stack-up stack-down lint fmt dry-run mlflow-ui bench clean env

env: $(STAMP)

# The stamp is rebuilt when pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)  ## run the default pipeline on the demo zoo
	$(BIN)/snakemake --cores $(CORES)

dry-run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --dry-run --quiet rules

# The team stack (docs/scale-out.md): single-node Slurm + slurmdbd/MariaDB, PostgreSQL, Ceph
# radosgw and an MLflow server, all on 127.0.0.1, installed and started by the project's own
# script (root on Debian; state in $$ENGINEFORGE_STACK_DIR, default /tmp/engineforge-stack).
STACK := bash workflow/stack/stack.sh

stack-up: $(STAMP)  ## start the team stack (installs its Debian packages the first time)
	$(STACK) up

stack-down:
	$(STACK) down

test: $(STAMP) stack-up  ## the whole test suite, the team-scale tests included (what CI runs)
	$(BIN)/python -m pytest -q --durations=25 tests

# The fast lane: unit tests only (no Snakemake run or dry run, no team stack; markers e2e and
# cluster in pyproject.toml), under 3 minutes on 2 cores.
test-fast: $(STAMP)  ## unit tests only: no Snakemake runs, no team stack, nothing slow
	$(BIN)/python -m pytest -q -m "not e2e and not cluster and not slow" --durations=15 tests

cluster-test: $(STAMP) stack-up  ## only the team-scale tests (tests/cluster)
	$(BIN)/python -m pytest -q --durations=10 tests/cluster

lint: $(STAMP)
	$(BIN)/ruff check workflow tests models calib benchmarks
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint --cores 1

fmt: $(STAMP)
	$(BIN)/snakefmt Snakefile workflow/rules

mlflow-ui: $(STAMP)  ## browse runs: http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

bench: $(STAMP)  ## benchmarks/ (figures go to docs/benchmarks.md)
	$(BIN)/python benchmarks/bench_pipeline.py

clean:
	rm -rf artifacts .snakemake mlruns mlflow.db
