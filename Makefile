# The few verbs everyone uses. `make demo` and `make test` work on a fresh machine
# with only Python 3.11, gcc and node: they build .venv and clients/node/node_modules first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NODE_STAMP := clients/node/node_modules/.installed
BUF_STAMP := tools/buf/node_modules/.installed
BUF := tools/buf/node_modules/.bin/buf

.PHONY: setup demo test test-slow lint protos check-protos bench bench-quick clean fuzz

setup: $(STAMP) $(NODE_STAMP) $(BUF_STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

$(NODE_STAMP): clients/node/package.json clients/node/package-lock.json
	cd clients/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(BUF_STAMP): tools/buf/package.json tools/buf/package-lock.json
	cd tools/buf && npm ci --no-audit --no-fund --loglevel=error
	touch $@

## The main job: start the service with a local Ray, train with 2 workers, compare with local torch.
demo: setup
	$(VENV)/bin/paramserver demo

## Lint, type-check, check the generated stubs, run every test but the few long chaos tests.
test: setup lint check-protos
	$(VENV)/bin/pytest -m "not slow"

## The longer tests (marked slow: SIGKILLed processes, simulated multi-node clusters, the longer DiLoCo and resume cases).
test-slow: setup
	$(VENV)/bin/pytest -m slow

## Property-based fuzzing of every JobService and ShardService request, at length (tests/fuzz;
## `make test` runs the same tests with a few examples each). PARAMSERVER_FUZZ_EXAMPLES=N to change.
FUZZ_EXAMPLES ?= 2000
fuzz: setup
	PARAMSERVER_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) PARAMSERVER_FUZZ_RANDOM=1 $(VENV)/bin/pytest tests/fuzz -p no:randomly -q -s

lint: $(STAMP) $(BUF_STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	cd protos && ../$(BUF) lint && ../$(BUF) build -o /dev/null

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

check-protos: $(STAMP)
	$(PY) scripts/gen_protos.py --check

bench: setup
	RAY_AUTH_MODE=disabled $(PY) bench/bench_foundation.py
	RAY_AUTH_MODE=disabled $(PY) bench/bench_snapshots.py
	$(PY) bench/bench_optimizers.py
	$(PY) bench/bench_spill.py
	RAY_AUTH_MODE=disabled $(PY) bench/bench_recovery.py
	RAY_AUTH_MODE=disabled $(PY) bench/bench_overlap.py
	RAY_AUTH_MODE=disabled $(PY) bench/bench_overlap.py --link-mbps 1000
	RAY_AUTH_MODE=disabled $(PY) bench/bench_security.py
	RAY_AUTH_MODE=disabled $(PY) bench/bench_observability.py
	RAY_AUTH_MODE=disabled $(PY) bench/bench_fanin.py
	RAY_AUTH_MODE=disabled $(PY) bench/bench_diloco.py

## Every benchmark in its quick mode (no thresholds: CI runs this so that none of them rots).
bench-quick: setup
	RAY_AUTH_MODE=disabled $(PY) bench/bench_foundation.py --quick
	RAY_AUTH_MODE=disabled $(PY) bench/bench_snapshots.py --quick
	$(PY) bench/bench_optimizers.py --quick
	$(PY) bench/bench_spill.py --quick
	RAY_AUTH_MODE=disabled $(PY) bench/bench_recovery.py --quick
	RAY_AUTH_MODE=disabled $(PY) bench/bench_overlap.py --quick
	RAY_AUTH_MODE=disabled $(PY) bench/bench_overlap.py --quick --link-mbps 200
	RAY_AUTH_MODE=disabled $(PY) bench/bench_security.py --quick
	RAY_AUTH_MODE=disabled $(PY) bench/bench_observability.py --quick
	RAY_AUTH_MODE=disabled $(PY) bench/bench_fanin.py --quick
	RAY_AUTH_MODE=disabled $(PY) bench/bench_diloco.py --quick

clean:
	rm -rf $(VENV) clients/node/node_modules .mypy_cache .ruff_cache .pytest_cache
