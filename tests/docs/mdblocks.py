"""Fenced code blocks of the documentation, with the doctest marker written before each.

A marker is an HTML comment on its own line right before a fence (blank lines between are
allowed), invisible on GitHub and in mkdocs::

    <!-- doctest: run -->           the sh block is run (bash -e), must exit 0
    <!-- doctest: run exit=1 -->    ... must exit 1
    <!-- doctest: output -->        every line of this text block appears in the output of
                                    the last run block before it
    <!-- doctest: fragment -->      a YAML part of a config: merged into a small valid
                                    config, then `enforcer check`
    <!-- doctest: rulesets -->      a YAML rulesets file: `enforcer check` on its own
    <!-- doctest: other (why) -->   YAML that is not enforcer's (Prometheus, Kubernetes):
                                    parsed only

A YAML block with a top-level ``version`` key is a whole config and needs no marker, and so
do Kubernetes objects (``apiVersion`` and ``kind`` in every document of the block).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "SECURITY.md",
               *(ROOT / "docs").glob("*.md")])

_FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)(.*)$")
_MARKER = re.compile(r"^<!--\s*doctest:\s*(.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    marker: str  # "" when none
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    out: list[Block] = []
    marker = ""
    i = 0
    while i < len(lines):
        m = _MARKER.match(lines[i].strip())
        if m:
            marker = m.group(1)
            i += 1
            continue
        fence = _FENCE.match(lines[i].strip())
        if fence:
            close = fence.group(1)
            body: list[str] = []
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(close):
                body.append(lines[j])
                j += 1
            out.append(Block(path, i + 1, fence.group(2).lower(), marker, "\n".join(body) + "\n"))
            marker = ""
            i = j + 1
            continue
        if lines[i].strip():
            marker = ""  # a marker belongs to the very next block
        i += 1
    return out


def all_blocks() -> list[Block]:
    return [b for path in DOCS for b in blocks(path)]
