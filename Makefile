# enforcer: `make demo` and `make test` work from a fresh clone (they create .venv).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast test-faults soak fuzz lint bench clean

# The editable install builds the native extension in place (enforcer/dataplane/_pump*.so):
# if a clean of the tree (git clean -x) removed it while .venv stayed, install again.
ifeq ($(wildcard enforcer/dataplane/_pump*.so),)
.PHONY: $(STAMP)
endif

$(STAMP): pyproject.toml setup.py enforcer/dataplane/_pump.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/enforcer demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not faults"

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow and not faults"

# The fault battery (docs/faults.md): network namespaces, nftables, a userspace impairment
# bridge, killed workers, a full tmpfs, fuzzing. Needs root; about 2 minutes on 2 cores.
test-faults: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m faults tests/faults tests/fuzz

# A sustained mixed workload through a sidecar pair (docs/faults.md): fails on a lost byte,
# RSS growth over 10% after the warm-up or a descriptor leak. SOAK_SECONDS=3600 for an hour.
SOAK_SECONDS ?= 600
soak: $(STAMP)
	$(PY) -m tests.faults.soak --seconds $(SOAK_SECONDS)

# Longer fuzzing of the parsers than the battery's 15 s per target (docs/faults.md).
FUZZ_SECONDS ?= 300
fuzz: $(STAMP)
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(PY) -m pytest -q -m faults tests/fuzz

lint: $(STAMP)
	$(VENV)/bin/ruff check enforcer tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m benchmarks $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
