"""setup_logging: the enforcer logger writes one line per event to stderr, never stdout."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest

from enforcer.observe.logging import setup_logging


@pytest.fixture(autouse=True)
def restore_enforcer_logger() -> Iterator[None]:
    logger = logging.getLogger("enforcer")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def test_text_lines_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info")
    log = logging.getLogger("enforcer.flowlog")
    log.debug("hidden")
    log.warning("sink %s failed\nsecond line", "file")
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 2  # the continuation is indented, so one event reads as one
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z WARNING enforcer\.flowlog: "
                        r"sink file failed", lines[0])
    assert lines[1] == "    second line"


def test_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("debug", json=True)
    log = logging.getLogger("enforcer.admin")
    log.debug("hello %d", 42)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    out, err = capsys.readouterr()
    assert out == ""
    first, second = (json.loads(line) for line in err.splitlines())
    assert first["level"] == "debug" and first["logger"] == "enforcer.admin"
    assert first["msg"] == "hello 42" and first["ts"].endswith("Z")
    assert second["level"] == "error" and "ValueError: boom" in second["exc"]


def test_calling_again_replaces_the_handler(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info")
    setup_logging("info")
    logging.getLogger("enforcer").info("once")
    assert capsys.readouterr().err.count("once") == 1


def test_unknown_level() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("loud")
