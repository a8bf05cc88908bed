"""``tls.mode: auto`` and server-first protocols: a client that says nothing for
``tls.detect_timeout`` is plaintext, so the upstream's banner (SMTP, MySQL, SSH) reaches it
instead of the connection stalling until handshake_timeout; TLS clients on the same
listener still get TLS. With ``detect_timeout: 0`` the old wait is back."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from enforcer.config.errors import ConfigError
from enforcer.config.loader import parse_config
from tests.conftest import require_tool
from tests.e2e.harness import inbound_cfg, random_bytes, sha
from tests.e2e.proc import EchoServer, EnforcerProcess, write_config
from tests.e2e.proxy_util import free_port

BANNER = b"220 mail.example ESMTP ready\r\n"


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n and (data := sock.recv(n - len(got))):
        got += data
    return got




def _auto(pki: Any, port: int, tmp_path: Path, relay: str, detect: str | None,
          handshake: str) -> EnforcerProcess:
    tls: dict[str, Any] = {"mode": "auto", "material": "mesh", "client_auth": "required"}
    if detect is not None:
        tls["detect_timeout"] = detect
    cfg = inbound_cfg(pki, port, default="allow", rules=[], listener_extra={"tls": tls},
                      limits={"handshake_timeout": handshake})
    return EnforcerProcess(write_config(tmp_path / "e.yaml", {"relay": relay, **cfg}))


@pytest.mark.parametrize("relay", ["python", "native"])
def test_a_silent_client_is_plaintext_and_gets_the_banner(tmp_path: Path, pki: Any,
                                                          relay: str) -> None:
    backend = EchoServer(banner=BANNER)
    # handshake_timeout far beyond the socket timeout: only the detect timeout can answer
    proc = _auto(pki, backend.port, tmp_path, relay, None, "60s")
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    payload = random_bytes(300_000)
    try:
        port = proc.wait_bound()["inbound"]
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            assert _read_exactly(sock, len(BANNER)) == BANNER
            sock.sendall(payload)
            assert sha(_read_exactly(sock, len(payload))) == sha(payload)
        raw = socket.create_connection(("127.0.0.1", port), timeout=15)
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:  # TLS still detected
            assert _read_exactly(tls, len(BANNER)) == BANNER
            tls.sendall(payload)
            assert sha(_read_exactly(tls, len(payload))) == sha(payload)
        records = proc.flow_records(2)
    finally:
        proc.stop()
        backend.close()
    plain, secure = sorted(records, key=lambda r: r["tls"] is not None)
    assert plain["tls"] is None and plain["action"] == "allow"
    assert plain["bytes"] == {"from_client": len(payload), "to_client": len(payload) + len(BANNER)}
    assert secure["tls"]["peer"] is not None and secure["action"] == "allow"


def test_detect_timeout_0_waits_for_the_handshake_timeout(tmp_path: Path, pki: Any) -> None:
    backend = EchoServer(banner=BANNER)
    proc = _auto(pki, backend.port, tmp_path, "native", "0s", "1s")
    try:
        port = proc.wait_bound()["inbound"]
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            assert sock.recv(100) == b""  # closed at handshake_timeout, no banner
        record = proc.flow_records(1)[0]
    finally:
        proc.stop()
        backend.close()
    assert (record["action"], record["close"]) == ("error", "handshake_timeout")
    assert record["upstream"] is None


@pytest.mark.parametrize(("tls", "message"), [
    ({"mode": "terminate", "material": "mesh", "detect_timeout": "100ms"}, "goes with mode auto"),

    ({"mode": "auto", "material": "mesh", "detect_timeout": "-1s"}, "detect_timeout"),
])
def test_detect_timeout_config_mistakes(pki: Any, tls: dict[str, Any], message: str) -> None:
    cfg = inbound_cfg(pki, 1, listener_extra={"tls": tls})
    with pytest.raises(ConfigError, match=message):
        parse_config(cfg)


def _banner_first(proc: EnforcerProcess, header: bytes | None) -> None:
    """A server-first exchange: the client sends nothing (or only ``header``) until the
    banner arrives, then 200 kB echoed back (sha256); its flow record is plaintext, from
    the header's address when there is one, and counts the banner."""
    payload = random_bytes(200_000)
    port = proc.wait_bound()["inbound"]
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        if header is not None:
            sock.sendall(header)
        assert _read_exactly(sock, len(BANNER)) == BANNER
        sock.sendall(payload)
        assert sha(_read_exactly(sock, len(payload))) == sha(payload)
    record = proc.flow_records(1)[0]
    assert (record["action"], record["tls"]) == ("allow", None)
    assert record["client"]["ip"] == ("127.0.0.1" if header is None else "198.51.100.7")
    assert record["bytes"] == {"from_client": len(payload),
                               "to_client": len(payload) + len(BANNER)}


@pytest.mark.parametrize("header", [None, b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 25\r\n"])
def test_optional_proxy_and_a_silent_client_do_not_stall(tmp_path: Path, pki: Any,
                                                         header: bytes | None) -> None:
    """``proxy_protocol.accept: optional`` on an auto listener: a server-first client
    that sends nothing (or only a PROXY header, as a gateway does) gets the banner after
    the detect timeout, not after the PROXY timeout (60 s here, beyond the socket's)."""
    backend = EchoServer(banner=BANNER)
    tls = {"mode": "auto", "material": "mesh", "client_auth": "optional"}
    pp = {"accept": "optional", "trusted_sources": ["127.0.0.1/32"], "timeout": "60s"}
    cfg = inbound_cfg(pki, backend.port, default="allow", rules=[],
                      listener_extra={"tls": tls, "proxy_protocol": pp},
                      limits={"handshake_timeout": "60s"})
    proc = EnforcerProcess(write_config(tmp_path / "e.yaml", cfg))
    try:
        _banner_first(proc, header)
    finally:
        proc.stop()
        backend.close()


class SocatBanner:
    """A real server-first backend: socat says the SMTP greeting at accept, then echoes."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        script = tmp_path / "banner.sh"  # a file: socat's address syntax has its own quoting
        script.write_text(f"#!/bin/sh\nprintf '{BANNER.decode().strip()}\\r\\n'\nexec cat\n")
        script.chmod(0o755)
        self.proc = subprocess.Popen(
            [require_tool("socat"), f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork",
             f"EXEC:{script}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        self.close()
        raise TimeoutError("socat did not listen")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


def _off_optional(pki: Any, port: int, tmp_path: Path, relay: str,
                  accept: str = "optional") -> EnforcerProcess:
    """tls.mode off with a PROXY header (the default detect_timeout, 200ms), the PROXY
    timeout (60 s) far beyond the client's socket timeout."""
    pp = {"accept": accept, "trusted_sources": ["127.0.0.1/32"], "timeout": "60s"}
    cfg = inbound_cfg(pki, port, default="allow", rules=[],
                      listener_extra={"tls": {"mode": "off"}, "proxy_protocol": pp})
    return EnforcerProcess(write_config(tmp_path / "e.yaml", {"relay": relay, **cfg}))


HEADER = b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 25\r\n"


@pytest.mark.parametrize(("relay", "backend", "header"), [
    ("python", "echo", None), ("native", "echo", None), ("native", "echo", HEADER),
    ("native", "socat", None), ("python", "socat", HEADER),
], ids=["python-silent", "native-silent", "native-header", "socat-silent", "socat-header"])
def test_tls_off_optional_proxy_and_a_silent_client_get_the_banner(
        tmp_path: Path, pki: Any, relay: str, backend: str, header: bytes | None) -> None:
    """``tls.mode: off`` with ``proxy_protocol.accept: optional``: a server-first client
    that sends nothing (or only a header) gets the banner after ``tls.detect_timeout``."""
    server: EchoServer | SocatBanner = EchoServer(banner=BANNER) if backend == "echo" \
        else SocatBanner(tmp_path)
    proc = _off_optional(pki, server.port, tmp_path, relay)
    try:
        _banner_first(proc, header)
    finally:
        proc.stop()
        server.close()


def test_tls_off_required_proxy_refuses_a_silent_client(tmp_path: Path, pki: Any) -> None:
    """A required header stays strict: silence is the PROXY timeout, no upstream connect."""
    server = EchoServer(banner=BANNER)
    pp = {"accept": "required", "trusted_sources": ["127.0.0.1/32"], "timeout": "1s"}
    cfg = inbound_cfg(pki, server.port, default="allow", rules=[],
                      listener_extra={"tls": {"mode": "off"}, "proxy_protocol": pp})
    proc = EnforcerProcess(write_config(tmp_path / "e.yaml", cfg))
    try:
        port = proc.wait_bound()["inbound"]
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            assert sock.recv(100) == b""  # closed at the PROXY timeout, no banner
        record = proc.flow_records(1)[0]
    finally:
        proc.stop()
        server.close()
    assert (record["action"], record["close"]) == ("error", "proxy_protocol_timeout")
    assert record["upstream"] is None and record["detail"] == "no complete PROXY header in time"


@pytest.mark.parametrize(("accept", "ok"), [("optional", True), ("required", False),
                                            ("off", False)])
def test_detect_timeout_on_tls_off_goes_with_optional_proxy(pki: Any, accept: str,
                                                            ok: bool) -> None:
    pp: dict[str, Any] = {"accept": accept}
    if accept != "off":
        pp["trusted_sources"] = ["127.0.0.1/32"]
    cfg = inbound_cfg(pki, 1, rules=[], listener_extra={
        "tls": {"mode": "off", "detect_timeout": "50ms"}, "proxy_protocol": pp})
    if ok:
        assert parse_config(cfg).listeners[0].tls.detect_timeout == 0.05
        return
    with pytest.raises(ConfigError, match=r"goes with proxy_protocol\.accept optional"):
        parse_config(cfg)
