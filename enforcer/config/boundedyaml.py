"""A YAML SafeLoader that refuses deep nesting early, in time linear in the input.

PyYAML's pure-Python scanner keeps one possible simple key per open flow collection and
re-checks all of them at every token (``stale_possible_simple_keys``), and it scans ahead
to the end of the input while any of them may still become a key. A file of 5,000 ``[``
therefore costs O(n^2) (about 20 s on a loaded 2-core host) before the composer, which
recurses once per level, runs out of stack. No config nests more than a handful of
levels, so this loader stops at ``MAX_DEPTH`` open collections (flow ``[``/``{`` or block
indentation levels) with ``TooDeep`` as soon as the scanner opens one more.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_DEPTH = 100  # open collections; the composer's recursion stays far below the stack limit


class TooDeep(Exception):
    """The document nests more than ``MAX_DEPTH`` collections."""


class BoundedSafeLoader(yaml.SafeLoader):
    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        if self.flow_level >= MAX_DEPTH:
            raise TooDeep
        super().fetch_flow_collection_start(TokenClass)

    def add_indent(self, column: Any) -> bool:
        if len(self.indents) >= MAX_DEPTH:
            raise TooDeep
        return bool(super().add_indent(column))


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` with the nesting bound; raises ``TooDeep`` or ``yaml.YAMLError``."""
    loader = BoundedSafeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
