# Two commands on a fresh clone: `make demo` and `make test`. Each sets up what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup demo test lint bench mutation clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU build of torch first, so the range in pyproject.toml needs nothing more.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

demo: setup
	$(VENV)/bin/streamlstm demo

test: setup
	./scripts/ensure-prometheus
	$(PY) -m ruff check streamlstm tests
	$(PY) -m mypy
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check streamlstm tests
	$(PY) -m ruff format --check streamlstm tests

bench: setup
	$(VENV)/bin/streamlstm bench engine

# Mutation testing of the core modules against the fast unit tests (not part of `make test`:
# hours for every module on two cores; see docs/mutation.md for sampling with
# MUTATION_SAMPLE). One module: make mutation MODULES="streamlstm.events"
mutation: setup
	VENV=$(VENV) ./scripts/mutation $(MODULES)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info mutants
