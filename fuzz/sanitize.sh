#!/usr/bin/env bash
# `make sanitize`: the native pump's tests once under AddressSanitizer + UndefinedBehavior-
# Sanitizer. The extension is compiled with both into a copy of the tree (the normal build
# in enforcer/dataplane stays as it is), Python runs with the ASan runtime preloaded (it is
# not instrumented itself), and any report aborts the process: a finding fails the run.
# Leak detection is off: an uninstrumented CPython's own allocations at exit are not ours.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-build/sanitize}
TESTS=${SANITIZE_TESTS:-tests/e2e/test_native_relay.py tests/e2e/test_tls_records.py
  tests/e2e/test_tls_records_refusals.py tests/e2e/test_tls_records_kat.py
  tests/e2e/test_tls_records_handover.py
  tests/e2e/test_tls_close_semantics.py tests/e2e/test_tls_interop_gnutls.py
  tests/e2e/test_acceptor.py tests/e2e/test_native_group.py}

rm -rf "$OUT" && mkdir -p "$OUT"
git ls-files -z enforcer tests pyproject.toml | xargs -0 cp --parents -t "$OUT"
cp enforcer/dataplane/_pump.pyi "$OUT/enforcer/dataplane/" 2>/dev/null || true
suffix=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
include=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
gcc -shared -fPIC -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined \
  -fno-sanitize-recover=all -Wall -Wextra -Werror=incompatible-pointer-types \
  -Wno-unused-parameter -Wno-missing-field-initializers -I"$include" \
  enforcer/dataplane/_pump.c enforcer/dataplane/pump/*.c -ldl \
  -o "$OUT/enforcer/dataplane/_pump$suffix"

asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
cd "$OUT"
export LD_PRELOAD="$asan:$ubsan"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=halt_on_error=1:abort_on_error=1:print_stacktrace=1
export PYTHONPATH="$PWD" PYTHONMALLOC=malloc
# the sanitized build must be the one that runs (a skip would prove nothing)
"$OLDPWD/$PY" -c 'from enforcer.dataplane import _pump, native
assert native.available(), native.unavailable_reason()
assert _pump.__file__.startswith(__import__("os").getcwd()), _pump.__file__'
# One process (no xdist): the runtime is preloaded into Python only; the peers the tests
# start (openssl, gnutls-cli) run without it.
# shellcheck disable=SC2086  # TESTS is a list of paths
"$OLDPWD/$PY" -c 'import os, sys, pytest
os.environ.pop("LD_PRELOAD")
sys.exit(pytest.main(sys.argv[1:]))' -q -p no:cacheprovider $TESTS
