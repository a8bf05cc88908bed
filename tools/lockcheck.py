"""Check that the dependency locks agree with pyproject.toml and with what is installed.

The locks (``requirements/*.lock``) are made by ``make lock`` with uv; every install path
(``make``, ``.ci/run``, the Dockerfile) installs them with ``--require-hashes``. Two ways
they can go wrong, each caught here with a message that names the fix:

``declared``
    a requirement in pyproject.toml (or in a lock's ``.in`` file) that its lock does not
    pin, or pins at a version outside the declared range: someone changed the
    dependencies without running ``make lock``.
``installed LOCK``
    the running interpreter's environment differs from the lock (a package missing,
    at another version, or present without being locked).

Only the standard library and ``packaging`` (which the dev lock pins) are used.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
REQS = ROOT / "requirements"
FIX = "run `make lock` and commit requirements/"
# The project itself is installed from the tree, not from a lock.
SELF = "enforcer"


@dataclass(frozen=True)
class Pin:
    name: str
    version: Version
    marker: Marker | None

    def applies(self) -> bool:
        return self.marker is None or self.marker.evaluate()


def read_pins(lock: Path) -> list[Pin]:
    """The ``name==version ; marker`` lines of a uv/pip-tools lock (hash lines skipped)."""
    pins = []
    for raw in _logical_lines(lock.read_text()):
        requirement = Requirement(raw)
        (spec,) = requirement.specifier
        if spec.operator != "==":
            raise ValueError(f"{lock.name}: {raw!r} is not pinned with ==")
        pins.append(Pin(canonicalize_name(requirement.name), Version(spec.version),
                        requirement.marker))
    return pins


def _logical_lines(text: str) -> Iterator[str]:
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            yield line.split(" --hash", 1)[0].strip()


def declared(extras: bool) -> list[Requirement]:
    """pyproject.toml's requirements (with every extra when ``extras``)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    if extras:
        for group in project.get("optional-dependencies", {}).values():
            found += [Requirement(r) for r in group]
    return found


def requirements_in(path: Path) -> list[Requirement]:
    return [Requirement(line) for line in _logical_lines(path.read_text())]


def check_declared(requirements: Iterable[Requirement], lock: Path) -> list[str]:
    """Problems with ``requirements`` against ``lock``: unpinned, or pinned out of range."""
    pins = read_pins(lock)
    problems = []
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name == SELF:
            continue
        versions = [p.version for p in pins if p.name == name]
        if not versions:
            problems.append(f"{lock.name} does not pin {requirement} (declared, not locked)")
        elif not any(requirement.specifier.contains(v, prereleases=True) for v in versions):
            shown = ", ".join(str(v) for v in versions)
            problems.append(f"{lock.name} pins {name}=={shown}, outside {requirement}")
    return problems


def check_agreement(first: Path, second: Path) -> list[str]:
    """Packages pinned by both locks must be pinned at the same version."""
    ours = {(p.name, str(p.marker)): p.version for p in read_pins(first)}
    return [f"{second.name} pins {p.name}=={p.version}, {first.name} pins "
            f"{ours[(p.name, str(p.marker))]}"
            for p in read_pins(second)
            if ours.get((p.name, str(p.marker)), p.version) != p.version]


def check_installed(lock: Path) -> list[str]:
    """Differences between this interpreter's environment and the pins that apply to it."""
    wanted: dict[str, Version] = {p.name: p.version for p in read_pins(lock) if p.applies()}
    have: dict[str, Version] = {canonicalize_name(d.metadata["Name"]): Version(d.version)
                                for d in metadata.distributions()}
    have.pop(SELF, None)
    problems = [f"{name}=={version} is locked but not installed"
                for name, version in sorted(wanted.items()) if name not in have]
    problems += [f"{name} is installed at {have[name]}, the lock says {version}"
                 for name, version in sorted(wanted.items())
                 if name in have and have[name] != version]
    problems += [f"{name}=={version} is installed but not locked"
                 for name, version in sorted(have.items()) if name not in wanted]
    return problems


def declared_problems() -> list[str]:
    problems = check_declared(declared(extras=True) + requirements_in(REQS / "build.in"),
                              REQS / "dev.lock")
    problems += check_declared(declared(extras=False), REQS / "runtime.lock")
    problems += check_declared(requirements_in(REQS / "build.in"), REQS / "build.lock")
    problems += check_agreement(REQS / "dev.lock", REQS / "runtime.lock")
    problems += check_agreement(REQS / "dev.lock", REQS / "build.lock")
    for source in sorted((REQS / "tools").glob("*.in")):
        problems += check_declared(requirements_in(source), source.with_suffix(".lock"))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("declared", help="the locks pin every declared requirement in range")
    installed = sub.add_parser("installed", help="this environment matches a lock exactly")
    installed.add_argument("lock", type=Path)
    args = parser.parse_args(argv)
    if args.command == "declared":
        problems, fix = declared_problems(), FIX
    else:
        problems = check_installed(args.lock)
        fix = "rebuild the environment from the lock (make clean && make test)"
    for problem in problems:
        print(f"lock: {problem}", file=sys.stderr)
    if problems:
        print(f"lock: the dependency lock is out of date: {fix}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
