# enforcer: `make demo` and `make test` work from a fresh clone (they create .venv).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean image image-test deploy-check

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
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check enforcer tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m benchmarks $(if $(QUICK),--quick,)

# The container image, built with podman from a locally made Debian base (.ci/image; no
# Docker daemon or registry needed), and its smoke test (tests/image).
IMAGE ?= localhost/enforcer:dev

image:
	IMAGE=$(IMAGE) .ci/image build

image-test: $(STAMP) image
	ENFORCER_TEST_IMAGE=$(IMAGE) $(PY) -m pytest -q tests/image

# The manifest checkers live in their own virtualenv (their dependencies would move ours).
TOOLS := .venv-tools
$(TOOLS)/.installed: requirements/deploy-tools.txt
	@test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet -r requirements/deploy-tools.txt
	@touch $@

# Every overlay of deploy/ renders, validates (Kubernetes 1.29 .. newest) and passes checkov;
# every enforcer config in it passes `enforcer check` (tests/e2e/test_deploy.py).
deploy-check: $(STAMP) $(TOOLS)/.installed
	$(TOOLS)/bin/python .ci/deploy-check
	$(PY) -m pytest -q tests/e2e/test_deploy.py

clean:
	rm -rf $(VENV) $(TOOLS) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
