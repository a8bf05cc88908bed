"""Links in the docs lead somewhere, and the code cites only files that exist.

Relative links must name an existing file, and a ``#fragment`` must be a heading (GitHub's
anchor rules) or an explicit ``id`` in that file. The code (sources, tests, build files)
may cite ``.md`` files only when they are in the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs.mdblocks import DOCS, ROOT

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
EXPLICIT_ID = re.compile(r"<a\s+id=\"([^\"]+)\"")
CODE_FILES = [p for pattern in ("enforcer/**/*.py", "enforcer/**/*.c", "tests/**/*.py",
                                "benchmarks/**/*.py", "tools/**/*.py", "config/*", "deploy/*",
                                ".ci/*")
              for p in ROOT.glob(pattern)] + [ROOT / n for n in (
                  "Makefile", "setup.py", "pyproject.toml", "Dockerfile")]
CITED_MD = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)+[\w.-]+\.md|[A-Z][A-Z_]+\.md)\b")


def slug(heading: str) -> str:
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    seen: dict[str, int] = {}
    out = set(EXPLICIT_ID.findall(text))
    for heading in HEADING.findall(text):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [a or b for a, b in LINK.findall(text)]


@pytest.mark.parametrize("page", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_links_resolve(page: Path) -> None:
    for target in links(page):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file_part, _, fragment = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
        assert dest.exists(), f"{page.relative_to(ROOT)}: broken link {target}"
        if fragment and dest.suffix == ".md":
            assert fragment in anchors(dest), f"{page.relative_to(ROOT)}: no #{fragment} in {rel}"


def test_code_cites_only_files_in_the_repository() -> None:
    for path in CODE_FILES:
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        for cited in CITED_MD.findall(path.read_text(errors="replace")):
            assert (ROOT / cited).is_file(), f"{path.relative_to(ROOT)} cites {cited}, not in the repository"


def test_readme_is_short_and_leads_to_the_guides() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for must in ("make demo", "make test", "docs/kubernetes.md", "docs/gateway-nlb.md",
                 "benchmarks/results/latest.png", "make bench"):
        assert must in readme


