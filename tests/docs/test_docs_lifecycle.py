"""docs/design.md's lifecycle table is the one the code runs (lifecycle_table.GRID)."""

from __future__ import annotations

from enforcer.dataplane.lifecycle_table import markdown
from tests.docs.mdblocks import ROOT

BEGIN, END = "<!-- lifecycle-table:begin -->\n", "<!-- lifecycle-table:end -->"


def test_design_md_has_the_code_s_table() -> None:
    text = (ROOT / "docs/design.md").read_text()
    assert BEGIN in text and END in text, "docs/design.md lost its lifecycle-table markers"
    documented = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert documented == markdown(), (
        "docs/design.md's lifecycle table differs from enforcer/dataplane/lifecycle_table.py: "
        "paste markdown() between the markers")
