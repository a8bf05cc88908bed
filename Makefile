# enforcer: `make demo` and `make test` work from a fresh clone (they create .venv).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

# The editable install builds the native extension in place (enforcer/dataplane/_pump*.so):
# if a clean of the tree (git clean -x) removed it while .venv stayed, install again.
ifeq ($(wildcard enforcer/dataplane/_pump*.so),)
.PHONY: $(STAMP)
endif

$(STAMP): pyproject.toml setup.py enforcer/dataplane/_pump.c $(wildcard enforcer/dataplane/pump/*)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/enforcer demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check enforcer tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m benchmarks $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
