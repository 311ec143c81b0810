# The two commands of the README: `make demo` and `make test`. Both bootstrap what is missing:
# Debian packages (as root, via apt-get), a virtualenv in .venv, and the package with its extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test unit lint bench bootstrap system-deps clean

demo: bootstrap
	$(BIN)/pgfailover drill

test: bootstrap
	$(BIN)/python -m pytest

unit: bootstrap
	$(BIN)/python -m pytest tests/unit

lint: bootstrap
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bootstrap: system-deps $(STAMP)

system-deps:
	@scripts/ensure-system-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
