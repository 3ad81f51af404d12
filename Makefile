# The two set-up commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv when it is missing and installs what it needs; assets are cached outside the repo
# in $DELTAFORMER_HOME (default ~/.cache/deltaformer).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint fetch bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned exactly: a looser spec would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/deltaformer demo --overwrite

fetch: $(STAMP)
	$(BIN)/python -m deltaformer.data.assets

test: $(STAMP) fetch
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not assets" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m mypy

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
