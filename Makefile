# Set-up lives here: `make demo` and `make test` create or refresh .venv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-fast lint install clean test-postgres

# Torch: keep a CUDA build if the venv already has one, else pin the 2.13.0 CPU wheel.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch, sys; sys.exit(0 if (torch.version.cuda or torch.__version__.startswith('2.13.0')) else 1)" 2>/dev/null \
		|| $(BIN)/python -m pip install --quiet torch==2.13.0
	@$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/refusal-lab demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# Test files run in parallel, one worker per core (tests/conftest.py splits the threads between them).
TEST_WORKERS ?= auto
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

test: lint
	$(PYTEST)

# The fast tier: every test that starts no subprocess and trains nothing (marked `slow` otherwise).
test-fast: lint
	$(PYTEST) -m "not slow" -q

# Two search workers on one study in a real PostgreSQL server (Debian's package; needs root).
test-postgres: $(STAMP)
	bash bench/postgres_workers.sh

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
