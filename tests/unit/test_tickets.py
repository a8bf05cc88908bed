"""tlsconf.tickets and the shared ticket keys of worker processes: the derivation, and real
resumptions between data planes built as two workers of one supervisor would build them
(same secret), over memory BIOs."""

from __future__ import annotations

import json
import os
import ssl
import time
from types import SimpleNamespace
from typing import Any

import pytest

from enforcer.config.loader import parse_config
from enforcer.dataplane import native
from enforcer.dataplane import plane as plane_module
from enforcer.dataplane.plane import DataPlane, StartupError
from enforcer.observe.flowlog import MemoryFlowLog
from enforcer.observe.metrics import NullMetrics
from enforcer.runtime.supervisor import worker_ticket_secret
from enforcer.tlsconf.context import build_client_context
from enforcer.tlsconf.material import load_material
from enforcer.tlsconf.tickets import (
    ROTATION_PERIOD,
    TICKET_KEY_BYTES,
    new_secret,
    rotation_epoch,
    ticket_keys,
)
from tests.e2e.harness import inbound_cfg
from tests.e2e.tls_util import bio_handshake, material_cfg

SECRET = bytes(range(32))


def test_keys_are_the_same_for_the_same_inputs_only() -> None:
    base = ticket_keys(SECRET, "inbound", "f" * 64, 7)
    assert len(base) == TICKET_KEY_BYTES
    assert ticket_keys(SECRET, "inbound", "f" * 64, 7) == base  # what every worker derives
    others = {ticket_keys(SECRET, "other", "f" * 64, 7),
              ticket_keys(SECRET, "inbound", "e" * 64, 7),
              ticket_keys(SECRET, "inbound", "f" * 64, 8),
              ticket_keys(new_secret(), "inbound", "f" * 64, 7)}
    assert base not in others and len(others) == 4
    assert ticket_keys(SECRET, "a", "b\0c", 1) != ticket_keys(SECRET, "a\0b", "c", 1)
    with pytest.raises(ValueError, match="a ticket secret is 32 bytes, got 31"):
        ticket_keys(SECRET[:31], "inbound", "f", 7)


def test_rotation_epochs_follow_the_wall_clock() -> None:
    assert rotation_epoch(7199.9) == 1 and rotation_epoch(7200.0) == 2
    assert rotation_epoch(10.0, period=5.0) == 2


needs_native = pytest.mark.skipif(not native.available(), reason=native.unavailable_reason())


def _plane(pki: Any, secret: bytes | None) -> DataPlane:
    plane = DataPlane(parse_config(inbound_cfg(pki, 9)), metrics=NullMetrics(),
                      flowlog=MemoryFlowLog(), ticket_secret=secret)
    plane.build()
    return plane


def _client(pki: Any, version: ssl.TLSVersion) -> ssl.SSLContext:
    material = load_material(material_cfg("c", cert=str(pki.client.cert),
                                          key=str(pki.client.key), ca=str(pki.ca)))
    ctx = build_client_context(material, mutual=True, check_hostname=False)
    ctx.maximum_version = version
    return ctx


def _resumes(issuer: ssl.SSLContext, other: ssl.SSLContext, client: ssl.SSLContext) -> bool:
    _s, first = bio_handshake(issuer, client)
    assert first.session is not None and first.session.has_ticket
    server, again = bio_handshake(other, client, session=first.session)
    assert again.session_reused == server.session_reused
    if server.session_reused:  # the ticket carried the client's certificate
        assert server.getpeercert(binary_form=True) is not None
    return server.session_reused


@needs_native
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_workers_resume_each_others_tickets(pki: Any, version: ssl.TLSVersion) -> None:
    one, two = _plane(pki, SECRET), _plane(pki, SECRET)
    assert one.shares_tickets and not one.listeners[0].server_ctx.options & ssl.OP_NO_TICKET
    client = _client(pki, version)
    one_ctx, two_ctx = one.listeners[0].server_ctx, two.listeners[0].server_ctx
    assert one_ctx is not None and two_ctx is not None
    assert _resumes(one_ctx, two_ctx, client)
    assert _resumes(two_ctx, one_ctx, client)
    stranger = _plane(pki, new_secret()).listeners[0].server_ctx
    assert stranger is not None and not _resumes(one_ctx, stranger, client)


@needs_native
def test_a_single_process_keeps_its_stateful_cache(pki: Any) -> None:
    plane = _plane(pki, None)
    ctx = plane.listeners[0].server_ctx
    assert not plane.shares_tickets and ctx is not None and ctx.options & ssl.OP_NO_TICKET
    assert _resumes(ctx, ctx, _client(pki, ssl.TLSVersion.TLSv1_3))


@needs_native
def test_shared_keys_rotate_with_the_period(pki: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a wall clock the test moves: the real one, with a period short enough for a test,
    could cross into the next period between any two lines on a loaded host."""
    now = [1000 * ROTATION_PERIOD + 10.0]  # 10 s into a period
    monkeypatch.setattr(plane_module, "time",
                        SimpleNamespace(time=lambda: now[0], monotonic=time.monotonic))
    plane = _plane(pki, SECRET)
    lst = plane.listeners[0]
    material = plane.materials["mesh"]
    before = plane.listener_context(material, lst.cfg.tls, lst.name)
    same = plane.listener_context(material, lst.cfg.tls, lst.name)
    epoch = plane.ticket_epoch
    client = _client(pki, ssl.TLSVersion.TLSv1_3)
    assert epoch == 1000 and not plane.ticket_keys_due()
    assert _resumes(before, same, client)
    now[0] += ROTATION_PERIOD
    assert plane.ticket_keys_due()  # a new period: every worker rotates
    # a reload before the rotation keeps the period of the other listeners' keys
    mid = plane.listener_context(material, lst.cfg.tls, lst.name)
    assert plane.ticket_epoch == epoch and plane.ticket_keys_due()
    assert _resumes(before, mid, client)
    plane.enter_ticket_period()  # what rotate_ticket_keys does before rebuilding
    after = plane.listener_context(material, lst.cfg.tls, lst.name)
    assert plane.ticket_epoch == epoch + 1 and not plane.ticket_keys_due()
    assert not _resumes(before, after, client)


@needs_native
def test_the_extension_refuses_bad_keys_and_suites_by_name(pki: Any) -> None:
    ctx = _plane(pki, None).listeners[0].server_ctx
    assert ctx is not None
    with pytest.raises(RuntimeError, match="ticket keys are 80 bytes, got 79"):
        native.set_ticket_keys(ctx, bytes(79))
    with pytest.raises(RuntimeError, match=r"OpenSSL refused the TLS 1\.3 cipher suites "
                                           r"TLS_NOT_A_SUITE"):
        native.set_ciphersuites(ctx, "TLS_NOT_A_SUITE")


@pytest.mark.parametrize(("written", "error"), [
    (SECRET, None),
    (SECRET[:16], "the supervisor's ticket secret is 16 bytes, not 32"),
    (SECRET + b"x", "the supervisor's ticket secret is 33 bytes, not 32"),
])
def test_a_worker_reads_the_secret_from_its_pipe(written: bytes, error: str | None) -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, written)
    os.close(write_end)
    spec = json.dumps({"ticket_secret_fd": read_end})
    if error is None:
        assert worker_ticket_secret(spec) == SECRET
    else:
        with pytest.raises(StartupError, match=error):
            worker_ticket_secret(spec)
    with pytest.raises(OSError):  # read once, then closed
        os.fstat(read_end)
    with pytest.raises(StartupError, match="the supervisor passed no ticket secret"):
        worker_ticket_secret("{}")
