"""``[::]`` listeners are dual-stack (one socket for IPv6 and IPv4, ``IPV6_V6ONLY`` off),
with one worker or several, and so is the admin listener; an IPv4 client of such a
listener is seen as IPv4 (rules, flow records), not as ``::ffff:a.b.c.d``. Any other IPv6
address is IPv6 only. (Transparent listeners on ``[::]`` read an IPv4 connection's
original destination with the IPv4 option: tests/e2e/test_across_hosts.py, whose sidecars
listen on ``[::]:15006`` as deploy/sidecar does.)"""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from enforcer.dataplane.sockets import dual_stack, set_v6only
from tests.e2e.harness import inbound_cfg, random_bytes, sha
from tests.e2e.proc import EchoServer, EnforcerProcess, write_config
from tests.e2e.proxy_util import free_port


def _free_port6() -> int:
    with socket.socket(socket.AF_INET6) as s:
        set_v6only(s, "::")
        s.bind(("::", 0))
        return int(s.getsockname()[1])


def _echo(host: str, port: int, payload: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=15) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while data := sock.recv(65536):
            got += data
    return got




def _readyz(host: str, port: int) -> int:
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/readyz"
    deadline = time.monotonic() + 15
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return int(resp.status)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_dual_stack_only_on_the_unspecified_address() -> None:
    assert dual_stack("::") and dual_stack("0::0")
    assert not dual_stack("::1") and not dual_stack("0.0.0.0") and not dual_stack("")
    for host, v6only in (("::", 0), ("::1", 1)):
        with socket.socket(socket.AF_INET6) as s:
            set_v6only(s, host)
            assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == v6only


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("relay", ["python", "native"])
def test_a_v6_wildcard_listener_takes_ipv4_and_ipv6(tmp_path: Path, pki: Any, workers: int,
                                                    relay: str) -> None:
    backend = EchoServer()
    admin = _free_port6()
    rules = [{"name": "ipv4-loopback", "action": "allow", "from": {"cidrs": ["127.0.0.0/8"]}},
             {"name": "ipv6-loopback", "action": "allow", "from": {"cidrs": ["::1/128"]}}]
    cfg = inbound_cfg(pki, backend.port, default="deny", rules=rules, mode="off",
                      listener_extra={"listen": "[::]:0"})
    cfg.update({"workers": workers, "relay": relay,
                "admin": {"listen": f"[::]:{admin}"}})
    proc = EnforcerProcess(write_config(tmp_path / "e.yaml", cfg))
    payloads = [random_bytes(150_000), random_bytes(150_001)]
    try:
        port = proc.wait_bound()["inbound"]
        assert _readyz("127.0.0.1", admin) == 200 and _readyz("::1", admin) == 200
        for host, payload in zip(("127.0.0.1", "::1"), payloads, strict=True):
            assert sha(_echo(host, port, payload)) == sha(payload)
        records = proc.flow_records(2)
    finally:
        proc.stop()
        backend.close()
    seen = sorted((r["client"]["ip"], r["rule"], r["bytes"]["from_client"]) for r in records)
    assert seen == [("127.0.0.1", "ipv4-loopback", len(payloads[0])),
                    ("::1", "ipv6-loopback", len(payloads[1]))]


def test_a_v6_loopback_listener_is_ipv6_only(tmp_path: Path, pki: Any) -> None:
    backend = EchoServer()
    port = free_port()
    cfg = inbound_cfg(pki, backend.port, default="allow", rules=[], mode="off",
                      listener_extra={"listen": f"[::1]:{port}"})
    proc = EnforcerProcess(write_config(tmp_path / "e.yaml", cfg))
    payload = random_bytes(10_000)
    try:
        assert proc.wait_bound()["inbound"] == port
        assert sha(_echo("::1", port, payload)) == sha(payload)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        proc.stop()
        backend.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_beside_an_ipv4_wildcard_listener_v6_wildcard_is_ipv6_only(tmp_path: Path, pki: Any,
                                                                 workers: int) -> None:
    """``0.0.0.0:P`` and ``[::]:P`` in one config split the families, as configs written
    before ``[::]`` was dual-stack do: each takes its own, both bind."""
    backend = EchoServer()
    port = free_port()
    cfg = inbound_cfg(pki, backend.port, default="allow", rules=[], mode="off",
                      listener_extra={"listen": f"0.0.0.0:{port}"})
    six = {**cfg["listeners"][0], "name": "inbound6", "listen": f"[::]:{port}"}
    cfg["listeners"].append(six)
    cfg["workers"] = workers
    proc = EnforcerProcess(write_config(tmp_path / "e.yaml", cfg))
    payloads = [random_bytes(20_000), random_bytes(20_001)]
    try:
        assert proc.wait_bound(2) == {"inbound": port, "inbound6": port}
        for host, payload in zip(("127.0.0.1", "::1"), payloads, strict=True):
            assert sha(_echo(host, port, payload)) == sha(payload)
        records = proc.flow_records(2)
    finally:
        proc.stop()
        backend.close()
    assert sorted((r["listener"], r["client"]["ip"]) for r in records) == [
        ("inbound", "127.0.0.1"), ("inbound6", "::1")]
