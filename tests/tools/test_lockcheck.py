"""tools/lockcheck.py: the locks agree with pyproject.toml and with the environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tools import lockcheck

ROOT = Path(__file__).resolve().parents[2]
DEV_LOCK = ROOT / "requirements" / "dev.lock"


def test_committed_locks_match_pyproject() -> None:
    assert lockcheck.declared_problems() == []


def test_an_unlocked_dependency_is_named() -> None:
    problems = lockcheck.check_declared([Requirement("left-pad>=1")], DEV_LOCK)
    assert problems == ["dev.lock does not pin left-pad>=1 (declared, not locked)"]


def test_a_range_the_lock_does_not_satisfy_is_named() -> None:
    (problem,) = lockcheck.check_declared([Requirement("cryptography>=999")], DEV_LOCK)
    assert problem.startswith("dev.lock pins cryptography==") and "outside" in problem


def test_locks_disagreeing_on_a_version_are_named(tmp_path: Path) -> None:
    other = tmp_path / "other.lock"
    other.write_text("orjson==1.0.0 \\\n    --hash=sha256:00\n")
    (problem,) = lockcheck.check_agreement(DEV_LOCK, other)
    assert problem.startswith("other.lock pins orjson==1.0.0, dev.lock pins ")


def test_unpinned_lock_line_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.lock"
    bad.write_text("orjson>=3\n")
    with pytest.raises(ValueError, match="not pinned with =="):
        lockcheck.read_pins(bad)


def test_this_environment_is_the_lock_exactly() -> None:
    """What `make` installed is what dev.lock says, nothing more (issue: pip freeze == lock)."""
    assert lockcheck.check_installed(DEV_LOCK) == []


def test_out_of_date_lock_fails_with_the_fix(tmp_path: Path) -> None:
    """A pyproject.toml with a dependency the lock lacks: the check exits 1 and says to run
    `make lock` (what `make test` and CI print before anything else runs)."""
    tree = tmp_path / "tree"
    (tree / "tools").mkdir(parents=True)
    (tree / "tools" / "lockcheck.py").write_text((ROOT / "tools" / "lockcheck.py").read_text())
    (tree / "requirements").mkdir()
    for lock in (ROOT / "requirements").glob("*.*"):
        (tree / "requirements" / lock.name).write_text(lock.read_text())
    pyproject = (ROOT / "pyproject.toml").read_text()
    (tree / "pyproject.toml").write_text(
        pyproject.replace('"orjson>=3.9,<4",', '"orjson>=3.9,<4",\n    "left-pad>=1",'))
    run = subprocess.run([sys.executable, str(tree / "tools" / "lockcheck.py"), "declared"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "runtime.lock does not pin left-pad>=1" in run.stderr
    assert "run `make lock` and commit requirements/" in run.stderr
