# enforcer: `make demo` and `make test` work from a fresh clone (they create .venv).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean fuzz sanitize

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

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
