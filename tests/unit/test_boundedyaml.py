"""The config's YAML loader stops at MAX_DEPTH open collections, before PyYAML's scanner
spends quadratic time on them (enforcer/config/boundedyaml.py)."""

from __future__ import annotations

import pytest
import yaml

from enforcer.config.boundedyaml import MAX_DEPTH, TooDeep, safe_load


def _flow(depth: int) -> str:
    return "a: " + "[" * depth + "]" * depth + "\n"


def _block(depth: int) -> str:
    """``depth`` block sequences, one inside the other, on one line (``- - - x``)."""
    return "a:\n  " + "- " * depth + "x\n"


def _nested(value: object, depth: int) -> object:
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("text", [_flow(MAX_DEPTH - 1), _block(MAX_DEPTH - 2)])
def test_nesting_below_the_bound_loads_as_pyyaml_does(text: str) -> None:
    assert safe_load(text) == yaml.safe_load(text)


def test_nesting_below_the_bound_has_the_right_shape() -> None:
    assert safe_load(_flow(3)) == {"a": _nested([], 2)}
    assert safe_load(_block(3)) == {"a": _nested("x", 3)}


@pytest.mark.parametrize("text", [_flow(MAX_DEPTH + 1), _flow(50_000), _block(MAX_DEPTH + 1),
                                  _block(50_000), "{a: " * 50_000])
def test_deeper_nesting_is_refused(text: str) -> None:
    with pytest.raises(TooDeep):
        safe_load(text)


def test_yaml_errors_are_still_yaml_errors() -> None:
    with pytest.raises(yaml.MarkedYAMLError):
        safe_load("a: [oops\n")
