# enforcer: `make demo` and `make test` work from a fresh clone (they create .venv).
#
# Every Python package comes from a lock with hashes (requirements/*.lock, made by uv):
# .venv is built from requirements/dev.lock, enforcer itself is installed editable on top
# without build isolation (so even the build backend is the locked one), and
# tools/lockcheck.py refuses a lock that no longer matches pyproject.toml. `make lock`
# moves every pin to the newest release deliberately, then runs the suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LOCKS  := requirements/dev.lock requirements/runtime.lock requirements/build.lock
PIP_LOCKED := -m pip install --quiet --require-hashes --only-binary :all:
UV_COMPILE = $(VENV)/bin/uv pip compile --quiet --generate-hashes --universal \
             --python-version 3.11 $(UPGRADE)
NATIVE_SOURCES := setup.py $(wildcard enforcer/dataplane/*.c enforcer/dataplane/*.h \
                  enforcer/dataplane/pump/*.c enforcer/dataplane/pump/*.h)

.PHONY: demo test test-fast lint bench clean lock lock-check check-installed test-debian13

# The editable install builds the native extension in place (enforcer/dataplane/_pump*.so):
# if a clean of the tree (git clean -x) removed it while .venv stayed, install again.
ifeq ($(wildcard enforcer/dataplane/_pump*.so),)
.PHONY: $(STAMP)
endif

# A changed lock rebuilds .venv from nothing, so it holds exactly what the lock says.
$(VENV)/.locked: requirements/dev.lock
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) $(PIP_LOCKED) -r requirements/dev.lock
	@touch $@

$(STAMP): $(VENV)/.locked pyproject.toml requirements/build.in $(LOCKS) $(NATIVE_SOURCES)
	@$(PY) tools/lockcheck.py declared
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/enforcer demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check enforcer tests benchmarks tools
	$(VENV)/bin/mypy

# The suite on Debian 13 (Python 3.13, OpenSSL 3.5) in a cached debootstrap chroot.
test-debian13:
	bash .ci/debian13

bench: $(STAMP)
	$(PY) -m benchmarks $(if $(QUICK),--quick,)

# The lock matches pyproject.toml, and .venv matches the lock exactly (CI runs both).
lock-check: $(STAMP)
	$(PY) tools/lockcheck.py declared
check-installed: $(STAMP)
	$(PY) tools/lockcheck.py installed requirements/dev.lock

# Refresh every lock to the newest releases pyproject.toml allows, then run the suite.
# `make lock UPGRADE=` re-locks without upgrading (after adding a dependency).
lock: UPGRADE ?= --upgrade
lock: $(VENV)/.locked
	$(UV_COMPILE) pyproject.toml requirements/build.in --all-extras -o requirements/dev.lock
	$(UV_COMPILE) pyproject.toml -o requirements/runtime.lock
	$(UV_COMPILE) requirements/build.in -o requirements/build.lock
	for tool in requirements/tools/*.in; do \
	  $(UV_COMPILE) $$tool -o $${tool%.in}.lock || exit 1; done
	$(MAKE) test

# Tools with dependency trees of their own (sslyze pins an older cryptography) get a
# virtualenv each, from their own lock: .tools/NAME/bin/NAME. Some ship only sources: they
# are built without build isolation, with the locked build backend (build.lock).
.tools/%/.installed: requirements/tools/%.lock requirements/build.lock
	rm -rf .tools/$*
	$(PYTHON) -m venv .tools/$*
	.tools/$*/bin/python $(PIP_LOCKED) -r requirements/build.lock
	.tools/$*/bin/python -m pip install --quiet --require-hashes --no-build-isolation -r $<
	@touch $@

clean:
	rm -rf $(VENV) .tools build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
