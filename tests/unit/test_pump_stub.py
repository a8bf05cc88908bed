"""The extension's stub (``enforcer/dataplane/_pump.pyi``, what mypy checks native.py
against) matches the built module: ``mypy.stubtest`` fails on a name the module lacks or
does not declare, or on a signature that differs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from enforcer.dataplane import native

pytestmark = [pytest.mark.skipif(not native.available(), reason=native.unavailable_reason()),
              pytest.mark.slow]  # runs mypy (~30 s)


def test_the_stub_matches_the_built_extension() -> None:
    allowlist = Path(__file__).with_name("pump_stub_allowlist.txt")
    done = subprocess.run([sys.executable, "-m", "mypy.stubtest", "enforcer.dataplane._pump",
                           "--allowlist", str(allowlist)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
