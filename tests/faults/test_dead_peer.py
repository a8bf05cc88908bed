"""Peers that vanish without a FIN or RST, and partitions that heal.

Three hosts (network namespaces): a client host, the proxy host running enforcer (a
gateway listening on the wildcard address, so its connections get the keepalive options)
and a backend host. ``Host.partition()`` drops every packet of a host with nftables: to
the proxy that host is simply gone. The TCP timeouts are shortened so that the kernel
gives up within seconds; the flow must then close with ``peer_timeout``, the surviving
side must see the end, and the proxy's descriptors must come back to where they were.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from enforcer.config.loader import parse_config
from enforcer.dataplane.tcpopts import detection_bound
from tests.e2e.proc import write_config
from tests.faults.netns import Hosts, hosts
from tests.faults.peers import Backend, NsEnforcer, echo_roundtrip, sha

pytestmark = [pytest.mark.faults]

LIMITS = {"tcp_keepalive_idle": "2s", "tcp_keepalive_interval": "1s",
          "tcp_keepalive_count": 3, "tcp_user_timeout": "5s", "close_timeout": "30s"}


def _bound() -> float:
    cfg = parse_config(_config("0.0.0.0", "10.0.0.1", 1, "python"))
    return detection_bound(cfg.limits)


def _config(listen: str, upstream: str, port: int, relay: str) -> dict[str, Any]:
    return {
        "version": 1, "node": {"name": "proxy"}, "relay": relay,
        "listeners": [{"name": "gw", "listen": f"{listen}:0", "tls": {"mode": "off"},
                       "ruleset": "open", "upstream": "app"}],
        "upstreams": {"app": {"address": f"{upstream}:{port}"}},
        "rulesets": {"open": {"default": "allow"}},
        "limits": LIMITS,
    }


class World:
    def __init__(self, made: Hosts, tmp: Path, relay: str, backend_mode: str) -> None:
        self.client, self.proxy, self.backend_host = (made.host("c"), made.host("p"),
                                                      made.host("b"))
        _, self.proxy_ip = made.link(self.client, self.proxy)
        _, self.backend_ip = made.link(self.proxy, self.backend_host)
        self.backend = Backend(self.backend_host.listen(self.backend_ip), backend_mode)
        cfg = write_config(tmp / "proxy.yaml", _config("0.0.0.0", self.backend_ip,
                                                       self.backend.port, relay))
        self.enforcer = NsEnforcer(self.proxy, cfg)
        self.port = self.enforcer.wait_bound()["gw"]

    def connect(self) -> socket.socket:
        sock = self.client.socket()
        sock.settimeout(60)
        sock.connect((self.proxy_ip, self.port))
        return sock

    def close(self) -> None:
        self.enforcer.stop()
        self.backend.close()


@pytest.fixture(params=["native", "python"])
def relay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _wait_fds(enf: NsEnforcer, target: int, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while (n := enf.fds()) > target and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


def _one_record(enf: NsEnforcer, timeout: float) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    rec = enf.wait_records(1, timeout=timeout)[0]
    return rec, time.monotonic() - started


def test_vanished_upstream_detected_within_bound(relay: str, tmp_path: Path,
                                                 faults_summary: Any) -> None:
    """An idle relayed connection whose backend host vanishes: keepalive probes go
    unanswered, the flow closes as peer_timeout, the client gets an end of stream."""
    bound = _bound()
    with hosts() as made:
        world = World(made, tmp_path, relay, "echo")
        try:
            baseline = world.enforcer.fds()
            sock = world.connect()
            payload = os.urandom(256 * 1024)
            sock.sendall(payload)
            got = bytearray()
            while len(got) < len(payload):
                got += sock.recv(65536)
            assert sha(bytes(got)) == sha(payload)
            world.backend_host.partition()
            rec, took = _one_record(world.enforcer, timeout=bound * 3 + 10)
            assert rec["close"] == "peer_timeout", rec
            assert "upstream stopped answering" in rec["detail"]
            assert rec["action"] == "allow" and rec["relay"] == relay
            assert rec["bytes"] == {"from_client": len(payload), "to_client": len(payload)}
            assert took <= bound * 2 + 5, f"detected after {took:.1f}s (bound {bound:.0f}s)"
            faults_summary(f"idle upstream gone: peer_timeout after {took:.1f} s "
                           f"(keepalive bound {bound:.0f} s)")
            assert sock.recv(65536) == b""  # the client is told: end of stream
            sock.close()
            assert _wait_fds(world.enforcer, baseline) <= baseline
        finally:
            world.close()


def test_vanished_client_with_data_in_flight(relay: str, tmp_path: Path,
                                             faults_summary: Any) -> None:
    """The client host vanishes while the backend streams to it: the proxy's unacknowledged
    data hits tcp_user_timeout, the flow closes as peer_timeout, the backend is closed."""
    bound = _bound()
    with hosts() as made:
        world = World(made, tmp_path, relay, "firehose")
        try:
            baseline = world.enforcer.fds()
            sock = world.connect()
            got = 0
            while got < 4 * 1024 * 1024:  # the stream flows
                got += len(sock.recv(65536))
            world.client.partition()
            rec, took = _one_record(world.enforcer, timeout=bound * 3 + 10)
            assert rec["close"] == "peer_timeout", rec
            assert "client stopped answering" in rec["detail"]
            assert took <= bound * 2 + 5, f"detected after {took:.1f}s (bound {bound:.0f}s)"
            faults_summary(f"client gone with data in flight: peer_timeout after {took:.1f} s "
                           f"(tcp_user_timeout {LIMITS['tcp_user_timeout']})")
            deadline = time.monotonic() + 10
            while not world.backend.ended and time.monotonic() < deadline:
                time.sleep(0.05)
            assert world.backend.ended, "the backend's connection was not closed"
            assert _wait_fds(world.enforcer, baseline) <= baseline
            sock.close()
        finally:
            world.close()


def test_partition_healing_within_bound_loses_nothing(relay: str, tmp_path: Path) -> None:
    """A 1.5 s partition of the backend host in the middle of an 8 MiB echo stream, well
    inside the timeouts: the stream completes byte-exact, the flow closes normally."""
    with hosts() as made:
        world = World(made, tmp_path, relay, "echo")
        try:
            payload = os.urandom(8 * 1024 * 1024)
            result: list[bytes] = []
            worker = threading.Thread(target=lambda: result.append(
                echo_roundtrip(world.client.socket(), (world.proxy_ip, world.port), payload)))
            worker.start()
            time.sleep(0.5)
            world.backend_host.partition()
            time.sleep(1.5)
            world.backend_host.heal()
            worker.join(120)
            assert result and sha(result[0]) == sha(payload)
            rec = world.enforcer.wait_records(1)[0]
            assert rec["close"] in ("client_fin", "upstream_fin"), rec
            assert rec["bytes"] == {"from_client": len(payload), "to_client": len(payload)}
        finally:
            world.close()
