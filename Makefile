# The two commands of the README: `make demo` and `make test`. Both bootstrap what is missing:
# Debian packages (as root, via apt-get), a virtualenv in .venv, and the package with its extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test unit lint generate bench reliability bootstrap system-deps clean

demo: bootstrap
	$(BIN)/pgfailover drill

test: bootstrap
	$(BIN)/python -m pytest

unit: bootstrap
	$(BIN)/python -m pytest tests/unit

# Sync twins generated from the marked *_async.py sources must be current before the rest.
lint: bootstrap
	$(BIN)/python tools/async_to_sync.py --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Write the sync twin X.py of every *_async.py source marked '# pgfailover: generate-sync'.
generate: bootstrap
	$(BIN)/python tools/async_to_sync.py

# The reliability suite at full size on fresh local clusters (about 10 minutes): writes
# docs/reliability.md and benchmarks/results/reliability.json.
reliability: bootstrap
	PYTHONPATH=benchmarks $(BIN)/python -m reliability --markdown docs/reliability.md \
		--json benchmarks/results/reliability.json

bootstrap: system-deps $(STAMP)

system-deps:
	@scripts/ensure-system-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .venv-psycopg-* .venv-django-* .mypy_cache .ruff_cache .pytest_cache .hypothesis
