"""The flow-record examples in docs/observability.md have the shape of real records.

``enforcer demo`` relays through a real mTLS pair and prints its flow records: the full
example (an allowed TLS connection with a verified peer) must have exactly the keys of the
demo's allowed inbound record, nested objects included; the abridged examples name only
keys that real records have.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.docs.mdblocks import ROOT, blocks
from tests.docs.test_docs_status import shape_problems


def documented_records() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    decoder = json.JSONDecoder()
    for block in blocks(ROOT / "docs/observability.md"):
        if block.lang != "json" or '"event"' not in block.text:
            continue
        text, pos = block.text.strip(), 0
        while pos < len(text):
            record, pos = decoder.raw_decode(text, pos)
            out.append(record)
            while pos < len(text) and text[pos].isspace():
                pos += 1
    return out


def demo_records(tmp_path: Path) -> list[dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "enforcer", "demo", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def abridged_problems(doc: Any, real: Any, where: str = "") -> list[str]:
    """Keys of ``doc`` that ``real`` lacks ("..." stands for left-out keys)."""
    if not (isinstance(doc, dict) and isinstance(real, dict)):
        return []
    out = [f"{where}.{k}: not in real records" for k in doc if k != "..." and k not in real]
    for key in set(doc) & set(real):
        out += abridged_problems(doc[key], real[key], f"{where}.{key}")
    return out


def test_documented_records_have_the_real_shape(tmp_path: Path) -> None:
    real = demo_records(tmp_path)
    allowed = next(r for r in real if r["listener"] == "inbound" and r["action"] == "allow")
    failed = next(r for r in real if r["action"] == "error")
    full, *abridged = documented_records()
    assert shape_problems(full, allowed) == []
    assert abridged, "the deny and error examples"
    for record in abridged:
        assert abridged_problems(record, {**failed, "detail": ""}) == []
