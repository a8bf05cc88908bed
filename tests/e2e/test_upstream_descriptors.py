"""Out of descriptors when opening the upstream socket (EMFILE): an upstream error like
any failed connect (its errno as the reason in enforcer_upstream_errors_total, close
``upstream_connect_failed``), logged as one WARNING without a traceback, not an internal
error; on the bare-socket connect of the native pump's plane and on the loop's
create_connection alike (``relay_mode``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from enforcer.dataplane import connection
from tests.e2e import harness
from tests.e2e.harness import Backend, Enforcer, inbound_cfg, random_bytes, running, sha

pytestmark = pytest.mark.usefixtures("relay_mode")


@contextlib.contextmanager
def one_descriptor_left() -> Iterator[None]:
    """The soft descriptor limit one above the lowest free descriptor: the next open
    (the accepted connection) succeeds, the one after it (the upstream socket) fails."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.dup(0)
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe + 1, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_emfile_on_the_upstream_socket_is_an_upstream_error(
        pki: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(connection._warned, "at", -connection.WARN_EVERY)
    backend = await Backend(mode="echo").start()
    cfg = inbound_cfg(pki, backend.port, default="allow", rules=[], mode="off")
    enforcer = await Enforcer(cfg).start()
    async with running(enforcer, backend):
        client = socket.socket()
        client.setblocking(False)
        try:
            with caplog.at_level(logging.DEBUG), one_descriptor_left():
                with contextlib.suppress(BlockingIOError):
                    client.connect(("127.0.0.1", enforcer.port()))
                rec = (await enforcer.wait_flows(1))[0]
        finally:
            client.close()
        assert (rec["action"], rec["close"]) == ("error", "upstream_connect_failed")
        assert rec["detail"] == f"connect to 127.0.0.1:{backend.port} failed: " \
            "Too many open files"
        assert enforcer.metrics.registry.get_sample_value(
            "enforcer_upstream_errors_total", {"upstream": "app", "reason": "emfile"}) == 1
        records = [r for r in caplog.records if r.name.startswith("enforcer")]
        assert [(r.levelno, r.exc_info) for r in records] == [(logging.WARNING, None)], \
            caplog.text
        assert "cannot open a socket to upstream 127.0.0.1" in records[0].getMessage()
        assert "Too many open files" in records[0].getMessage()
        assert "internal error" not in caplog.text
        assert backend.connections == 0

        # with descriptors back, the next connection goes through, byte-exact
        payload = random_bytes(200_000)
        assert sha(await harness.exchange(enforcer.port(), payload)) == sha(payload)
        await asyncio.wait_for(backend.done.wait(), 5)
        assert sha(backend.received[0]) == sha(payload)
