# savlt-fl: every target creates the venv on first use (make install is idempotent).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/simulate

.PHONY: install test simulate bench lint clean

install: $(STAMP)

# Python caches each module's bytecode when it is first imported, so the 19,000 files of
# the venv are not compiled at install (pip's default, half the install) when a run imports
# about 5,000 of them. Where the environment turns that cache off (PYTHONDONTWRITEBYTECODE),
# every process would compile its imports again: the targets below turn it back on.
export PYTHONDONTWRITEBYTECODE :=

# torch and torchvision are pinned first so that pip takes the builds on this machine's disk.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-compile torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --no-compile -e '.[dev]'
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
