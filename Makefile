# savlt-fl: every target creates the venv on first use (make install is idempotent).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/simulate

.PHONY: install test simulate bench lint clean

install: $(STAMP)

# uv installs what pip would, downloading and unpacking in parallel (README, "Dependencies
# beyond the core", has the timings). It reads no pip configuration, so it is handed pip's:
# its indexes (a machine's local index of torch builds, say), find-links and constraints,
# and pip's choice among the indexes (the best version on any of them). It does not
# byte-compile the venv's 19,000 files (40 s more on 2 cores) when a run imports about
# 5,000 of them: Python caches those at their first import (20 s, once). torch and
# torchvision are pinned to the builds this project is tested with.
PIP_INDEXES = $(BIN)/pip config list 2>/dev/null \
	| sed -n -E "s/^[^.]*\.(index-url|extra-index-url|find-links|constraint)='(.*)'$$/\1 \2/p" \
	| while read -r key values; do for v in $$values; do printf -- '--%s %s ' $$key $$v; done; done

# Where the environment turns that cache off (PYTHONDONTWRITEBYTECODE), every process would
# compile its imports again: the targets below turn it back on.
export PYTHONDONTWRITEBYTECODE :=

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q 'uv>=0.6'
	$(BIN)/uv pip install -q --python $(BIN)/python \
		--index-strategy unsafe-best-match $$($(PIP_INDEXES)) \
		torch==2.14.1 torchvision==0.29.1 -e '.[dev]'
	touch $(STAMP)

# Two workers: the tests that start Ray share one xdist group (tests/conftest.py), the rest
# run beside them; each worker's torch gets its share of the cores (tests/conftest.py).
test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/pytest -q -n 2 --dist loadgroup

simulate: install
	$(BIN)/savlt simulate --config configs/default.yaml --out $(OUT)

bench: install
	$(BIN)/python benchmarks/run_cpu.py

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
