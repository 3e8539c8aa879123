# The README's commands. Each target does its own install into .venv.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast sweep bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The main job: the offline CPU quickstart (convert -> finetune -> report).
demo: $(STAMP)
	$(BIN)/symconvert run recipes/quickstart.yaml --set out=runs/quickstart --overwrite

## The whole test suite, sweep included (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

## Everything but the architecture sweep and the training tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m "not sweep and not slow" $(PYTEST_ARGS)

sweep: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m sweep $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks

lint: $(STAMP)
	$(BIN)/ruff check symconvert tests benchmarks scripts

clean:
	rm -rf $(VENV) runs .pytest_cache
