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

.PHONY: demo test test-hosts test-fast test-faults soak fuzz fuzz-parsers sanitize lint bench clean \
        lock lock-check check-installed test-debian13 image image-test deploy-check

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
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not faults" --ignore=$(HOSTS_TEST)

# The whole path across hosts (six network namespaces, four enforcers, haproxy), on its own;
# CI runs it after make test. (Its new connections through the NLB failing with SSLError
# under the suite's load was the test client's TLS send and read running in two threads
# on one SSL object: tests/e2e/netapps.py now does both in one.)
HOSTS_TEST := tests/e2e/test_across_hosts.py
test-hosts: $(STAMP)
	$(PY) -m pytest -q $(HOSTS_TEST)

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

# Longer fuzzing of the Python parsers than the battery's 15 s per target (docs/faults.md).
PARSER_FUZZ_SECONDS ?= 300
fuzz-parsers: $(STAMP)
	FUZZ_SECONDS=$(PARSER_FUZZ_SECONDS) $(PY) -m pytest -q -m faults tests/fuzz

lint: $(STAMP)
	$(VENV)/bin/ruff check enforcer tests benchmarks tools
	$(VENV)/bin/mypy

# The suite on Debian 13 (Python 3.13, OpenSSL 3.5) in a cached debootstrap chroot.
test-debian13:
	bash .ci/debian13

# libFuzzer on every C function that parses network bytes (the own TLS 1.3 record layer,
# fuzz/fuzz_records.c), from the committed corpus, for FUZZ_SECONDS; a crash, an ASan or
# UBSan report or a timeout fails. New inputs go to build/fuzz/new, not to the corpus.
FUZZ_SECONDS ?= 60
FUZZ_CFLAGS := -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
	-Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers
fuzz:
	@mkdir -p build/fuzz/new
	clang $(FUZZ_CFLAGS) -o build/fuzz/fuzz_records fuzz/fuzz_records.c fuzz/ossl_linked.c \
		enforcer/dataplane/pump/records.c -lssl -lcrypto
	build/fuzz/fuzz_records -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
		-print_final_stats=1 build/fuzz/new fuzz/corpus/records

# The native pump's tests once with the extension built with ASan + UBSan (fuzz/sanitize.sh).
sanitize: $(STAMP)
	PY=$(PY) fuzz/sanitize.sh

bench: $(STAMP)
	$(PY) -m benchmarks $(if $(QUICK),--quick,)

# SNI passthrough: enforcer vs haproxy vs nginx routing TLS by SNI (docs/performance.md)
.PHONY: bench-passthrough
bench-passthrough: $(STAMP)
	$(PY) -m benchmarks --passthrough $(if $(QUICK),--quick,)

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
# virtualenv each, from their own lock: .tools/NAME/bin/NAME. A tool whose .in says
# "# sdists: yes" ships some packages only as sources: they are built without build
# isolation, with the locked build backend (build.lock); the others install wheels only.
.tools/%/.installed: requirements/tools/%.lock requirements/build.lock
	rm -rf .tools/$*
	$(PYTHON) -m venv .tools/$*
	if grep -q '^# sdists: yes' requirements/tools/$*.in; then \
	  .tools/$*/bin/python $(PIP_LOCKED) -r requirements/build.lock && \
	  .tools/$*/bin/python -m pip install --quiet --require-hashes --no-build-isolation -r $<; \
	else .tools/$*/bin/python $(PIP_LOCKED) -r $<; fi
	@touch $@

# The container image, built with podman from a locally made Debian base (.ci/image; no
# Docker daemon or registry needed), and its smoke test (tests/image).
# One tag per checkout: checkouts on one machine share podman's storage (and its cache).
IMAGE ?= localhost/enforcer:dev-$(shell pwd | cksum | cut -d' ' -f1)

image:
	IMAGE=$(IMAGE) .ci/image build

image-test: $(STAMP) image
	ENFORCER_TEST_IMAGE=$(IMAGE) $(PY) -m pytest -q tests/image

# Every overlay of deploy/ renders, validates (Kubernetes 1.29 .. newest) and passes checkov
# (the checkers from their own lock, in .tools/deploy-check); every enforcer config in it
# passes `enforcer check` (tests/e2e/test_deploy.py).
deploy-check: $(STAMP) .tools/deploy-check/.installed
	.tools/deploy-check/bin/python .ci/deploy-check
	$(PY) -m pytest -q tests/e2e/test_deploy.py

clean:
	rm -rf $(VENV) .tools build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
