"""The runtime falls back to the standard asyncio loop when uvloop cannot load."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest
import uvloop

from enforcer.runtime.server import new_event_loop


def test_uvloop_is_used_when_it_loads() -> None:
    loop = new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_standard_loop_when_uvloop_cannot_load(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    # setup_logging() (run by other tests in this process) stops propagation: listen on
    # the logger itself
    logger = logging.getLogger("enforcer.runtime")
    logger.addHandler(caplog.handler)
    monkeypatch.setattr(logger, "level", logging.WARNING)
    loop = new_event_loop()
    try:
        assert not isinstance(loop, uvloop.Loop)
        assert isinstance(loop, asyncio.AbstractEventLoop)
        assert loop.run_until_complete(asyncio.sleep(0, result="ran")) == "ran"
    finally:
        loop.close()
    logger.removeHandler(caplog.handler)
    assert "uvloop is not available" in caplog.text
